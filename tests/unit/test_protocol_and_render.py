"""Request validation and SSE/response rendering, without a server."""

from __future__ import annotations

import json

import pytest
from pydantic import ValidationError

from serving.api.protocol import ChatCompletionRequest, CompletionRequest
from serving.api.render import DONE_EVENT, Renderer, sse_event
from serving.engines.base import ChoiceDelta, TokenLogprob
from serving.errors import ContextLengthError, InvalidRequestError, NotFoundError, RateLimitError


def chat(**kw):
    return ChatCompletionRequest.model_validate(
        {"model": "m", "messages": [{"role": "user", "content": "hi"}], **kw}
    )


def test_chat_defaults_and_max_completion_tokens_wins() -> None:
    r = chat(max_tokens=5, max_completion_tokens=9)
    assert r.requested_max_tokens() == 9
    assert r.n == 1 and r.temperature == 1.0 and r.stop_list() == ()
    assert chat().requested_max_tokens() is None


@pytest.mark.parametrize(
    "bad",
    [
        {"max_tokens": 0},
        {"max_tokens": -1},
        {"max_tokens": "7"},
        {"temperature": 2.5},
        {"top_p": 0},
        {"n": 0},
        {"n": 100},
        {"stop": [""]},
        {"stop": ["a"] * 17},
        {"stream": "true"},
        {"top_logprobs": 21},
        {"presence_penalty": 3},
        {"messages": []},
        {"messages": [{"role": "alien", "content": "x"}]},
    ],
)
def test_chat_rejects_bad_fields(bad: dict) -> None:
    body = {"model": "m", "messages": [{"role": "user", "content": "hi"}], **bad}
    with pytest.raises(ValidationError):
        ChatCompletionRequest.model_validate(body)


def test_top_logprobs_requires_logprobs() -> None:
    with pytest.raises(ValueError, match="requires logprobs"):
        chat(top_logprobs=2).logprobs_k()
    assert chat(logprobs=True, top_logprobs=2).logprobs_k() == 2
    assert chat(logprobs=True).logprobs_k() == 0


def test_completion_prompt_forms() -> None:
    assert CompletionRequest.model_validate({"model": "m", "prompt": ["one"]}).prompt == "one"
    assert CompletionRequest.model_validate({"model": "m", "prompt": [1, 2, 3]}).prompt == [1, 2, 3]
    assert CompletionRequest.model_validate({"model": "m", "prompt": "x"}).requested_max_tokens() == 16
    for bad in (["a", "b"], [], ""):
        with pytest.raises(ValidationError):
            CompletionRequest.model_validate({"model": "m", "prompt": bad})


def test_content_parts_are_joined() -> None:
    r = ChatCompletionRequest.model_validate(
        {
            "model": "m",
            "messages": [
                {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}
            ],
        }
    )
    assert r.messages[0].text() == "ab"


def _events(raw: bytes) -> list[dict]:
    out = []
    for ev in raw.split(b"\n\n"):
        if ev:
            assert ev.startswith(b"data: ")
            out.append(json.loads(ev[6:]))
    return out


def test_chat_stream_events_carry_role_once_and_usage_null() -> None:
    r = Renderer("chat", "abc", "tiny", include_usage=True)
    first = _events(r.stream_events([ChoiceDelta(0, "Hel", 1)]))
    second = _events(r.stream_events([ChoiceDelta(0, "lo", 1, finish_reason="length")]))
    assert first[0]["id"] == "chatcmpl-abc" and first[0]["object"] == "chat.completion.chunk"
    assert first[0]["choices"][0]["delta"] == {"role": "assistant", "content": "Hel"}
    assert second[0]["choices"][0]["delta"] == {"content": "lo"}
    assert second[0]["choices"][0]["finish_reason"] == "length"
    assert first[0]["usage"] is None
    usage = _events(r.usage_event(5, 2, 3))[0]
    assert usage["choices"] == [] and usage["usage"] == {
        "prompt_tokens": 5,
        "completion_tokens": 2,
        "total_tokens": 7,
        "prompt_tokens_details": {"cached_tokens": 3},
    }


def test_empty_deltas_produce_no_event_and_done_frame() -> None:
    r = Renderer("completion", "x", "tiny", include_usage=False)
    assert r.stream_events([ChoiceDelta(0, "", 0)]) == b""
    assert DONE_EVENT == b"data: [DONE]\n\n"
    ev = _events(r.stream_events([ChoiceDelta(1, "ab", 1)]))[0]
    assert ev["object"] == "text_completion" and ev["choices"][0] == {
        "index": 1,
        "text": "ab",
        "logprobs": None,
        "finish_reason": None,
    }
    assert "usage" not in ev


def test_unicode_is_not_escaped_and_sse_event_is_json() -> None:
    assert sse_event({"t": "é"}) == 'data: {"t":"é"}\n\n'.encode()


def test_final_bodies_with_logprobs() -> None:
    lp = [TokenLogprob("a", -0.5, [("a", -0.5), ("b", -1.0)]), TokenLogprob("bc", -0.1, [])]
    chat_body = Renderer("chat", "i", "m", False).final_body({0: "abc"}, {0: "stop"}, {0: lp}, 3, 2)
    assert chat_body["usage"]["total_tokens"] == 5
    content = chat_body["choices"][0]["logprobs"]["content"]
    assert content[0]["top_logprobs"][1] == {"token": "b", "logprob": -1.0, "bytes": [98]}
    comp = Renderer("completion", "i", "m", False).final_body({0: "abc"}, {0: "length"}, {0: lp}, 3, 2)
    assert comp["choices"][0]["logprobs"]["text_offset"] == [0, 1]
    assert comp["choices"][0]["logprobs"]["top_logprobs"][0] == {"a": -0.5, "b": -1.0}


def test_error_bodies_are_openai_shaped() -> None:
    for err, status in (
        (InvalidRequestError("bad", param="n"), 400),
        (ContextLengthError("long"), 400),
        (NotFoundError("nope"), 404),
        (RateLimitError("slow down", headers={"Retry-After": "2"}), 429),
    ):
        body = err.body()["error"]
        assert set(body) == {"message", "type", "param", "code"}
        assert err.status_code == status
    assert ContextLengthError("x").code == "context_length_exceeded"
