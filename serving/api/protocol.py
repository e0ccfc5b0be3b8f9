"""OpenAI request bodies (validated), response builders and the error body.

Nothing a client sends is dropped silently. Each field of a request body, of a chat message, of a
content part and of ``stream_options`` is one of:

* implemented: the gateway acts on it or passes it to the engine (:data:`IMPLEMENTED_FIELDS`);
* an OpenAI or vLLM field Tokenweir does not implement, accepted only with a value that asks for
  nothing (``tools: []``, ``store: false``, ``top_k: -1``: :class:`Harmless`,
  :data:`HARMLESS_FIELDS`) and refused with 400 naming it for any other value;
* anything else: refused with 400 naming it (``extra="forbid"``), never ignored.

Wrong types and out-of-range values are errors too. :func:`request_error` turns a body's
:class:`ValidationError` into the 400's message and ``param`` (``messages[2].tool_calls``).
"""

from __future__ import annotations

import json
from typing import Annotated, Any, Final, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    GetCoreSchemaHandler,
    GetJsonSchemaHandler,
    StrictBool,
    StrictInt,
    ValidationError,
    field_validator,
)
from pydantic.json_schema import JsonSchemaValue
from pydantic_core import CoreSchema, PydanticCustomError, core_schema

from serving.errors import validation_message

MAX_N = 16
MAX_STOP = 16

UNSUPPORTED_VALUE: Final = "unsupported_value"
"""The pydantic error type of a :class:`Harmless` field given a value that asks for something."""
_REFUSALS = frozenset({UNSUPPORTED_VALUE, "extra_forbidden"})


class Harmless:
    """Field metadata: a field Tokenweir does not implement, accepted only with one of ``values``
    (those that ask for nothing); any other value is the validation error :data:`UNSUPPORTED_VALUE`.
    Its JSON Schema is ``{"enum": values}``.

    ``best_of: Annotated[object, Harmless(None, 1)] = None``. Booleans match only booleans (``true``
    is not ``1``); numbers match by value (``0`` is ``0.0``).
    """

    __slots__ = ("_allowed", "values")

    def __init__(self, *values: object) -> None:
        self.values = values
        shown = [json.dumps(v) for v in values]
        self._allowed = " or ".join(filter(None, (", ".join(shown[:-1]), shown[-1])))

    def accepts(self, value: object) -> bool:
        """Whether ``value`` asks for nothing."""
        return any(value == h and isinstance(value, bool) == isinstance(h, bool) for h in self.values)

    def _check(self, value: object) -> object:
        if self.accepts(value):
            return value
        raise PydanticCustomError(UNSUPPORTED_VALUE, "accepted only as {allowed}", {"allowed": self._allowed})

    def __get_pydantic_core_schema__(self, source: Any, handler: GetCoreSchemaHandler) -> CoreSchema:
        return core_schema.no_info_plain_validator_function(self._check)

    def __get_pydantic_json_schema__(
        self, schema: CoreSchema, handler: GetJsonSchemaHandler
    ) -> JsonSchemaValue:
        return {"enum": list(self.values)}


def request_error(e: ValidationError) -> tuple[str, str | None]:
    """A request body's validation error as the 400's ``(message, param)``.

    A refused field (unknown, or a :class:`Harmless` one asking for something) comes first and is
    named by its full path, ``param`` included (``messages[2].tool_calls``); any other error is
    :func:`serving.errors.validation_message`'s rendering of the first one.
    """
    errors = e.errors()
    for err in errors:
        if err["type"] in _REFUSALS:
            param = _path(err["loc"])
            if err["type"] == UNSUPPORTED_VALUE:
                return (
                    f"`{param}` is not supported by this server (accepted only as {err['ctx']['allowed']})",
                    param,
                )
            return f"Unrecognized request argument supplied: `{param}` (unknown fields are refused)", param
    return validation_message(errors[0])


def _path(loc: tuple[int | str, ...]) -> str:
    """``("messages", 2, "tool_calls")`` as ``messages[2].tool_calls``; pydantic's union tags
    (``list[TextPart]``, never the last part: that is the field, whatever its name) are left out."""
    out = ""
    for i, part in enumerate(loc):
        if isinstance(part, int):
            out += f"[{part}]"
        elif part.isidentifier() or i == len(loc) - 1:
            out += f".{part}" if out else part
    return out


class StreamOptions(BaseModel):
    """``stream_options`` of a streamed request."""

    model_config = ConfigDict(extra="forbid")

    include_usage: StrictBool = False
    """Send a final chunk with ``usage`` and no choices."""
    include_obfuscation: Annotated[object, Harmless(None, False)] = None
    continuous_usage_stats: Annotated[object, Harmless(None, False)] = None
    """vLLM's usage in every chunk."""


class TextPart(BaseModel):
    """A text content part of a chat message."""

    model_config = ConfigDict(extra="forbid")

    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    """One chat message: its role and text. The other fields of an assistant message as OpenAI, the
    openai SDK and vLLM serialize it (a previous response sent back) are accepted when empty."""

    model_config = ConfigDict(extra="forbid")

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None
    name: str | None = None
    """The participant's name, given to the chat template with the message (as vLLM's server does;
    a template that does not use it leaves it out)."""
    refusal: Annotated[object, Harmless(None)] = None
    annotations: Annotated[object, Harmless(None, [])] = None
    audio: Annotated[object, Harmless(None)] = None
    function_call: Annotated[object, Harmless(None)] = None
    tool_calls: Annotated[object, Harmless(None, [])] = None
    tool_call_id: Annotated[object, Harmless(None)] = None
    reasoning_content: Annotated[object, Harmless(None)] = None
    reasoning: Annotated[object, Harmless(None)] = None

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


class _SamplingFields(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=False)

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

    # Not implemented, accepted only with values that ask for nothing (OpenAI's, then vLLM's).
    best_of: Annotated[object, Harmless(None, 1)] = None
    logit_bias: Annotated[object, Harmless(None, {})] = None
    response_format: Annotated[object, Harmless(None, {"type": "text"})] = None
    cache_salt: Annotated[object, Harmless(None)] = None
    """Set by the gateway per organization (``prefix_cache_scope``), never by a client."""
    use_beam_search: Annotated[object, Harmless(None, False)] = None
    top_k: Annotated[object, Harmless(None, -1, 0)] = None
    min_p: Annotated[object, Harmless(None, 0.0)] = None
    repetition_penalty: Annotated[object, Harmless(None, 1.0)] = None
    length_penalty: Annotated[object, Harmless(None, 1.0)] = None
    stop_token_ids: Annotated[object, Harmless(None, [])] = None
    bad_words: Annotated[object, Harmless(None, [])] = None
    include_stop_str_in_output: Annotated[object, Harmless(None, False)] = None
    skip_special_tokens: Annotated[object, Harmless(None, True)] = None
    spaces_between_special_tokens: Annotated[object, Harmless(None, True)] = None
    truncate_prompt_tokens: Annotated[object, Harmless(None)] = None
    allowed_token_ids: Annotated[object, Harmless(None)] = None
    prompt_logprobs: Annotated[object, Harmless(None)] = None
    logits_processors: Annotated[object, Harmless(None)] = None
    return_tokens_as_token_ids: Annotated[object, Harmless(None, False)] = None
    return_token_ids: Annotated[object, Harmless(None, False)] = None
    structured_outputs: Annotated[object, Harmless(None)] = None
    guided_json: Annotated[object, Harmless(None)] = None
    guided_regex: Annotated[object, Harmless(None)] = None
    guided_choice: Annotated[object, Harmless(None)] = None
    guided_grammar: Annotated[object, Harmless(None)] = None
    guided_decoding_backend: Annotated[object, Harmless(None)] = None
    guided_whitespace_pattern: Annotated[object, Harmless(None)] = None
    structural_tag: Annotated[object, Harmless(None)] = None
    priority: Annotated[object, Harmless(None, 0)] = None
    request_id: Annotated[object, Harmless(None)] = None
    """The caller's id is the ``x-request-id`` header."""
    kv_transfer_params: Annotated[object, Harmless(None)] = None
    vllm_xargs: Annotated[object, Harmless(None)] = None

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

    # Not implemented, accepted only with values that ask for nothing (OpenAI's, then vLLM's).
    tools: Annotated[object, Harmless(None, [])] = None
    tool_choice: Annotated[object, Harmless(None, "none")] = None
    parallel_tool_calls: Annotated[object, Harmless(None)] = None
    functions: Annotated[object, Harmless(None, [])] = None
    function_call: Annotated[object, Harmless(None, "none")] = None
    audio: Annotated[object, Harmless(None)] = None
    modalities: Annotated[object, Harmless(None, ["text"])] = None
    prediction: Annotated[object, Harmless(None)] = None
    store: Annotated[object, Harmless(None, False)] = None
    metadata: Annotated[object, Harmless(None, {})] = None
    """Tags a stored completion; nothing is stored."""
    service_tier: Annotated[object, Harmless(None, "auto", "default")] = None
    reasoning_effort: Annotated[object, Harmless(None)] = None
    verbosity: Annotated[object, Harmless(None)] = None
    web_search_options: Annotated[object, Harmless(None)] = None
    prompt_cache_key: Annotated[object, Harmless(None)] = None
    prompt_cache_retention: Annotated[object, Harmless(None)] = None
    safety_identifier: Annotated[object, Harmless(None)] = None
    echo: Annotated[object, Harmless(None, False)] = None
    add_generation_prompt: Annotated[object, Harmless(None, True)] = None
    continue_final_message: Annotated[object, Harmless(None, False)] = None
    add_special_tokens: Annotated[object, Harmless(None, False)] = None
    """The chat template writes the special tokens; none are added."""
    documents: Annotated[object, Harmless(None)] = None
    chat_template: Annotated[object, Harmless(None)] = None
    chat_template_kwargs: Annotated[object, Harmless(None, {})] = None
    mm_processor_kwargs: Annotated[object, Harmless(None)] = None

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

    # Not implemented, accepted only with values that ask for nothing (OpenAI's, then vLLM's).
    echo: Annotated[object, Harmless(None, False)] = None
    suffix: Annotated[object, Harmless(None, "")] = None
    add_special_tokens: Annotated[object, Harmless(None, True)] = None
    """The prompt's special tokens are added, as vLLM adds them."""
    prompt_embeds: Annotated[object, Harmless(None)] = None

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


def _implemented(model: type[BaseModel]) -> frozenset[str]:
    return frozenset(n for n, f in model.model_fields.items() if not _harmless(f.metadata))


def _accepted_if_harmless(model: type[BaseModel]) -> dict[str, tuple[object, ...]]:
    return {n: h.values for n, f in model.model_fields.items() if (h := _harmless(f.metadata))}


def _harmless(metadata: list[Any]) -> Harmless | None:
    return next((m for m in metadata if isinstance(m, Harmless)), None)


_BODIES: Final[dict[str, type[BaseModel]]] = {
    "chat": ChatCompletionRequest,
    "completion": CompletionRequest,
    "message": ChatMessage,
    "stream_options": StreamOptions,
}
IMPLEMENTED_FIELDS: Final = {name: _implemented(model) for name, model in _BODIES.items()}
"""The fields Tokenweir implements, by body (``chat``, ``completion``, a chat ``message``,
``stream_options``): what the gateway acts on or passes to the engine (``SamplingSpec``)."""
HARMLESS_FIELDS: Final = {name: _accepted_if_harmless(model) for name, model in _BODIES.items()}
"""The fields Tokenweir does not implement, by body, with the only values accepted (those that ask
for nothing). Any other value, and any field in neither list, is refused with 400."""


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
