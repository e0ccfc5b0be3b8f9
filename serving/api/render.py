"""Build OpenAI response bodies and SSE events from engine chunks.

Per-token work lives here, so it is plain string building with ``json.dumps`` of small dicts.
"""

from __future__ import annotations

import json
import time
from typing import Any, Literal

from serving.engines.base import ChoiceDelta, TokenLogprob

DONE_EVENT = b"data: [DONE]\n\n"
_dumps = json.JSONEncoder(ensure_ascii=False, separators=(",", ":")).encode


def sse_event(obj: Any) -> bytes:
    """One server-sent event carrying ``obj`` as JSON."""
    return b"data: " + _dumps(obj).encode() + b"\n\n"


def usage_dict(prompt_tokens: int, completion_tokens: int, cached_tokens: int = 0) -> dict[str, Any]:
    """OpenAI ``usage`` object, with ``prompt_tokens_details.cached_tokens`` (the prompt tokens the
    engine found in its prefix cache, as OpenAI and vLLM report them)."""
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
        "prompt_tokens_details": {"cached_tokens": cached_tokens},
    }


def _chat_logprobs(items: list[TokenLogprob]) -> dict[str, Any]:
    return {
        "content": [
            {
                "token": lp.token,
                "logprob": lp.logprob,
                "bytes": list(lp.token.encode("utf-8", "replace")),
                "top_logprobs": [
                    {"token": t, "logprob": v, "bytes": list(t.encode("utf-8", "replace"))} for t, v in lp.top
                ],
            }
            for lp in items
        ]
    }


def _completion_logprobs(items: list[TokenLogprob], text_offset0: int) -> dict[str, Any]:
    offsets, pos = [], text_offset0
    for lp in items:
        offsets.append(pos)
        pos += len(lp.token)
    return {
        "tokens": [lp.token for lp in items],
        "token_logprobs": [lp.logprob for lp in items],
        "top_logprobs": [dict(lp.top) for lp in items],
        "text_offset": offsets,
    }


class Renderer:
    """Renders one request's stream or final body in the chat or completions format."""

    __slots__ = ("_created", "_head", "_id", "_kind", "_model", "_offsets", "_role_sent", "include_usage")

    def __init__(self, kind: Literal["chat", "completion"], request_id: str, model: str, include_usage: bool):
        self._kind = kind
        self._id = ("chatcmpl-" if kind == "chat" else "cmpl-") + request_id
        self._model = model
        self._created = int(time.time())
        self.include_usage = include_usage
        self._role_sent: set[int] = set()
        self._offsets: dict[int, int] = {}
        obj = "chat.completion.chunk" if kind == "chat" else "text_completion"
        # Common prefix of every streamed chunk, built once.
        self._head = (
            f'{{"id":{_dumps(self._id)},"object":"{obj}","created":{self._created},"model":{_dumps(model)},'
        ).encode()

    def stream_events(self, deltas: list[ChoiceDelta]) -> bytes:
        """SSE events for new output (one event per choice that changed)."""
        out = []
        tail = b',"usage":null}' if self.include_usage else b"}"
        for d in deltas:
            if not d.text and d.finish_reason is None and not d.logprobs:
                continue
            choice: dict[str, Any]
            if self._kind == "chat":
                delta: dict[str, Any] = {"content": d.text}
                if d.index not in self._role_sent:
                    self._role_sent.add(d.index)
                    delta = {"role": "assistant", "content": d.text}
                choice = {
                    "index": d.index,
                    "delta": delta,
                    "logprobs": _chat_logprobs(d.logprobs) if d.logprobs else None,
                    "finish_reason": d.finish_reason,
                }
            else:
                off = self._offsets.get(d.index, 0)
                self._offsets[d.index] = off + len(d.text)
                choice = {
                    "index": d.index,
                    "text": d.text,
                    "logprobs": _completion_logprobs(d.logprobs, off) if d.logprobs else None,
                    "finish_reason": d.finish_reason,
                }
            out.append(
                b"data: " + self._head + b'"choices":[' + _dumps(choice).encode() + b"]" + tail + b"\n\n"
            )
        return b"".join(out)

    def usage_event(self, prompt_tokens: int, completion_tokens: int, cached_tokens: int = 0) -> bytes:
        """The final chunk of ``stream_options.include_usage``: no choices, only usage."""
        return (
            b"data: "
            + self._head
            + b'"choices":[],"usage":'
            + _dumps(usage_dict(prompt_tokens, completion_tokens, cached_tokens)).encode()
            + b"}\n\n"
        )

    def final_body(
        self,
        texts: dict[int, str],
        finish: dict[int, str | None],
        logprobs: dict[int, list[TokenLogprob]] | None,
        prompt_tokens: int,
        completion_tokens: int,
        cached_tokens: int = 0,
    ) -> dict[str, Any]:
        """The non-streamed response body."""
        choices = []
        for i in sorted(texts):
            lps = logprobs.get(i) if logprobs is not None else None
            if self._kind == "chat":
                choices.append(
                    {
                        "index": i,
                        "message": {"role": "assistant", "content": texts[i]},
                        "logprobs": _chat_logprobs(lps) if lps is not None else None,
                        "finish_reason": finish.get(i),
                    }
                )
            else:
                choices.append(
                    {
                        "index": i,
                        "text": texts[i],
                        "logprobs": _completion_logprobs(lps, 0) if lps is not None else None,
                        "finish_reason": finish.get(i),
                    }
                )
        return {
            "id": self._id,
            "object": "chat.completion" if self._kind == "chat" else "text_completion",
            "created": self._created,
            "model": self._model,
            "choices": choices,
            "usage": usage_dict(prompt_tokens, completion_tokens, cached_tokens),
        }
