"""OpenAI request bodies (validated), response builders and the error body.

Wrong types and out-of-range values are errors. Fields of the OpenAI API that Tokenweir does not
implement are refused when they ask for something (:func:`unsupported_field`), never dropped
silently; other unknown fields are ignored (as vLLM's server does).
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, field_validator

MAX_N = 16
MAX_STOP = 16


class StreamOptions(BaseModel):
    """``stream_options`` of a streamed request."""

    model_config = ConfigDict(extra="ignore")

    include_usage: StrictBool = False
    """Send a final chunk with ``usage`` and no choices."""


class TextPart(BaseModel):
    """A text content part of a chat message."""

    model_config = ConfigDict(extra="ignore")

    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    """One chat message."""

    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None
    name: str | None = None

    def text(self) -> str:
        """The message's text, content parts joined."""
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(p.text for p in self.content)


PositiveInt = Annotated[StrictInt, Field(ge=1)]
_INT64 = (-(2**63), 2**63 - 1)
"""vLLM's range for ``seed`` (a torch long)."""

_UNSUPPORTED: dict[str, tuple[object, ...]] = {
    "best_of": (None, 1),
    "logit_bias": (None, {}),
    "tools": (None, []),
    "tool_choice": (None, "none"),
    "functions": (None, []),
    "function_call": (None, "none"),
    "response_format": (None, {"type": "text"}),
    "parallel_tool_calls": (None,),
    "prediction": (None,),
    "audio": (None,),
    "modalities": (None, ["text"]),
    "cache_salt": (None,),
}
"""OpenAI request fields not implemented here, with the values that ask for nothing (accepted)."""


def unsupported_field(body: dict[str, Any]) -> str | None:
    """The first field of ``body`` that asks for something not supported, or None."""
    for name, harmless in _UNSUPPORTED.items():
        if name in body and body[name] not in harmless:
            return name
    return None


class _SamplingFields(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=False)

    model: str = Field(min_length=1)
    max_tokens: PositiveInt | None = None
    temperature: float = Field(default=1.0, ge=0.0, le=2.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    n: StrictInt = Field(default=1, ge=1, le=MAX_N)
    stop: str | list[str] | None = None
    seed: StrictInt | None = Field(default=None, ge=_INT64[0], le=_INT64[1])
    presence_penalty: float = Field(default=0.0, ge=-2.0, le=2.0)
    frequency_penalty: float = Field(default=0.0, ge=-2.0, le=2.0)
    user: str | None = None
    stream: StrictBool = False
    stream_options: StreamOptions | None = None
    ignore_eos: StrictBool = False
    min_tokens: StrictInt = Field(default=0, ge=0)

    @field_validator("stop")
    @classmethod
    def _stop_list(cls, v: str | list[str] | None) -> str | list[str] | None:
        if isinstance(v, list):
            if len(v) > MAX_STOP:
                raise ValueError(f"at most {MAX_STOP} stop sequences are allowed, got {len(v)}")
            if any(s == "" for s in v):
                raise ValueError("stop sequences must not be empty")
        elif v == "":
            raise ValueError("stop sequences must not be empty")
        return v

    def stop_list(self) -> tuple[str, ...]:
        """``stop`` as a tuple."""
        if self.stop is None:
            return ()
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)

    def include_usage(self) -> bool:
        """Whether a streamed response ends with a usage chunk."""
        return bool(self.stream_options and self.stream_options.include_usage)


class ChatCompletionRequest(_SamplingFields):
    """``POST /v1/chat/completions``."""

    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: PositiveInt | None = None
    logprobs: StrictBool = False
    top_logprobs: StrictInt | None = Field(default=None, ge=0, le=20)

    def requested_max_tokens(self) -> int | None:
        """``max_completion_tokens`` wins over the older ``max_tokens``."""
        return self.max_completion_tokens or self.max_tokens

    def logprobs_k(self) -> int | None:
        """Top-k alternatives to return per token, or None for no logprobs."""
        if not self.logprobs:
            if self.top_logprobs:
                raise ValueError("top_logprobs requires logprobs to be true")
            return None
        return self.top_logprobs or 0


class CompletionRequest(_SamplingFields):
    """``POST /v1/completions`` (one prompt: a string or a list of token ids)."""

    prompt: str | list[StrictInt] | list[str] = Field()
    logprobs: StrictInt | None = Field(default=None, ge=0, le=20)
    echo: StrictBool = False
    suffix: str | None = None

    @field_validator("prompt")
    @classmethod
    def _one_prompt(cls, v: Any) -> Any:
        if isinstance(v, list):
            if not v:
                raise ValueError("prompt must not be empty")
            if isinstance(v[0], str):
                if len(v) != 1:
                    raise ValueError("only one prompt per request is supported; send one request per prompt")
                return v[0]
        if v == "":
            raise ValueError("prompt must not be empty")
        return v

    def requested_max_tokens(self) -> int | None:
        """Completions default to 16 tokens, as OpenAI's API does."""
        return self.max_tokens if self.max_tokens is not None else 16

    def logprobs_k(self) -> int | None:
        """Top-k alternatives per token, or None."""
        return self.logprobs


class ErrorDetail(BaseModel):
    """The ``error`` object of an OpenAI error body."""

    model_config = ConfigDict(extra="forbid")

    message: str
    type: str
    param: str | None
    code: str | None


class ErrorBody(BaseModel):
    """Every client-visible error: ``{"error": {"message", "type", "param", "code"}}``
    (:meth:`serving.errors.APIError.body`)."""

    model_config = ConfigDict(extra="forbid")

    error: ErrorDetail
