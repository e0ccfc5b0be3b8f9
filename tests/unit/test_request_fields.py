"""Nothing a client sends is dropped silently (issue 13): every field of a request body is
implemented, accepted only with a value that asks for nothing, or refused with a 400 naming it, in
the request path the gateway runs (:meth:`GatewayService.prepare`)."""

from __future__ import annotations

import json
from typing import Any

import httpx
import jsonschema
import openai
import pytest
from pydantic import ValidationError

from serving.api.protocol import (
    HARMLESS_FIELDS,
    IMPLEMENTED_FIELDS,
    ChatCompletionRequest,
    CompletionRequest,
)
from serving.api.render import Renderer
from serving.errors import InvalidRequestError, NotFoundError
from serving.gateway.service import GatewayService

USER = {"role": "user", "content": "hi"}
CHAT: dict[str, Any] = {"model": "m", "messages": [USER]}
COMPLETION: dict[str, Any] = {"model": "m", "prompt": "hi"}


def prepare(kind: str, body: dict[str, Any]) -> None:
    """The gateway's validation step: a service serving no model, so a body that passes it ends in
    ``NotFoundError`` for its model, and one refused ends in ``InvalidRequestError``."""
    service = GatewayService({}, {}, pools=None, first_token_timeout_s=1.0)  # type: ignore[arg-type]
    service.prepare(kind, body)  # type: ignore[arg-type]


def refused(kind: str, body: dict[str, Any]) -> dict[str, Any]:
    with pytest.raises(InvalidRequestError) as ei:
        prepare(kind, body)
    assert ei.value.status_code == 400
    return ei.value.body()["error"]


def accepted(kind: str, body: dict[str, Any]) -> None:
    with pytest.raises(NotFoundError):
        prepare(kind, body)


def test_the_implemented_fields_are_these() -> None:
    sampling = {"model", "max_tokens", "temperature", "top_p", "n", "stop", "seed", "presence_penalty",
                "frequency_penalty", "user", "stream", "stream_options", "ignore_eos", "min_tokens"}  # fmt: skip
    assert IMPLEMENTED_FIELDS["chat"] == sampling | {
        "messages",
        "max_completion_tokens",
        "logprobs",
        "top_logprobs",
    }
    assert IMPLEMENTED_FIELDS["completion"] == sampling | {"prompt", "logprobs"}
    assert IMPLEMENTED_FIELDS["message"] == {"role", "content", "name"}
    assert IMPLEMENTED_FIELDS["stream_options"] == {"include_usage"}
    for body, harmless in HARMLESS_FIELDS.items():
        assert not harmless.keys() & IMPLEMENTED_FIELDS[body], body
        assert all(None in values for values in harmless.values()), body


@pytest.mark.parametrize(
    ("kind", "body", "param"),
    [
        ("chat", {**CHAT, "temprature": 0.5}, "temprature"),
        ("completion", {**COMPLETION, "maxtokens": 5}, "maxtokens"),
        ("completion", {**COMPLETION, "tools": []}, "tools"),  # a chat field
        ("chat", {**CHAT, "top-k": 5}, "top-k"),
        ("chat", {**CHAT, "stream": True, "stream_options": {"include_usage": True, "every": 1}}, "stream_options.every"),
        ("chat", {**CHAT, "messages": [USER, {"role": "assistant", "content": "x", "thoughts": "y"}]}, "messages[1].thoughts"),
        ("chat", {**CHAT, "messages": [{"role": "user", "content": [{"type": "text", "text": "a", "cache_control": {}}]}]},
         "messages[0].content[0].cache_control"),
    ],
)  # fmt: skip
def test_an_unknown_field_is_refused_by_name(kind: str, body: dict[str, Any], param: str) -> None:
    err = refused(kind, body)
    assert err["param"] == param
    assert err["type"] == "invalid_request_error"
    assert f"Unrecognized request argument supplied: `{param}`" in err["message"]


@pytest.mark.parametrize(
    ("kind", "body", "param"),
    [
        ("chat", {**CHAT, "top_k": 50}, "top_k"),
        ("completion", {**COMPLETION, "repetition_penalty": 1.2}, "repetition_penalty"),
        ("chat", {**CHAT, "min_p": 0.1}, "min_p"),
        ("chat", {**CHAT, "guided_json": {"type": "object"}}, "guided_json"),
        ("chat", {**CHAT, "stop_token_ids": [2]}, "stop_token_ids"),
        ("chat", {**CHAT, "store": True}, "store"),
        ("chat", {**CHAT, "metadata": {"team": "a"}}, "metadata"),
        ("chat", {**CHAT, "service_tier": "flex"}, "service_tier"),
        ("chat", {**CHAT, "reasoning_effort": "low"}, "reasoning_effort"),
        ("chat", {**CHAT, "best_of": True}, "best_of"),  # true is not 1
        ("chat", {**CHAT, "cache_salt": "guess"}, "cache_salt"),  # a client cannot pick a salt
        ("completion", {**COMPLETION, "echo": True}, "echo"),
        ("completion", {**COMPLETION, "suffix": "end"}, "suffix"),
        (
            "chat",
            {**CHAT, "stream_options": {"include_obfuscation": True}},
            "stream_options.include_obfuscation",
        ),
    ],
)
def test_a_field_not_implemented_is_refused_unless_it_asks_for_nothing(
    kind: str, body: dict[str, Any], param: str
) -> None:
    err = refused(kind, body)
    assert err["param"] == param
    assert err["message"].startswith(f"`{param}` is not supported by this server (accepted only as null")


def test_a_refused_field_is_named_before_other_errors() -> None:
    err = refused("chat", {**CHAT, "temperature": 9, "top_k": 50})
    assert err["param"] == "top_k"
    err = refused("chat", {**CHAT, "temperature": 9})
    assert err["param"] == "temperature"  # other errors as before


HARMLESS_CHAT = {
    "best_of": 1, "logit_bias": {}, "response_format": {"type": "text"}, "tools": [], "tool_choice": "none",
    "functions": [], "function_call": "none", "modalities": ["text"], "store": False, "metadata": {},
    "service_tier": "auto", "reasoning_effort": None, "verbosity": None, "web_search_options": None,
    "audio": None, "parallel_tool_calls": None, "prediction": None, "top_k": -1, "min_p": 0,
    "repetition_penalty": 1, "length_penalty": 1.0, "stop_token_ids": [], "skip_special_tokens": True,
    "spaces_between_special_tokens": True, "include_stop_str_in_output": False, "use_beam_search": False,
    "add_generation_prompt": True, "echo": False, "priority": 0, "guided_json": None,
    "stream_options": {"include_usage": True, "continuous_usage_stats": False, "include_obfuscation": False},
}  # fmt: skip


def test_values_that_ask_for_nothing_are_accepted() -> None:
    accepted("chat", {**CHAT, **HARMLESS_CHAT})
    req = ChatCompletionRequest.model_validate({**CHAT, **HARMLESS_CHAT})
    assert req.include_usage()
    accepted(
        "completion", {**COMPLETION, "echo": False, "suffix": None, "top_k": 0, "add_special_tokens": True}
    )
    assert HARMLESS_CHAT.keys() <= HARMLESS_FIELDS["chat"].keys() | {"stream_options"}


def test_our_own_assistant_message_goes_back_in_messages() -> None:
    body = Renderer("chat", "r1", "m", include_usage=False).final_body({0: "hello"}, {0: "stop"}, None, 3, 1)
    message = json.loads(json.dumps(body["choices"][0]["message"]))
    req = ChatCompletionRequest.model_validate({**CHAT, "messages": [USER, message, USER]})
    assert [m.text() for m in req.messages] == ["hi", "hello", "hi"]
    accepted("chat", {**CHAT, "messages": [USER, message, USER]})


def sent_by_the_openai_sdk(messages: list[Any]) -> dict[str, Any]:
    """The body the official client sends for ``messages`` (captured at its HTTP transport)."""
    sent: list[dict[str, Any]] = []

    def answer(request: httpx.Request) -> httpx.Response:
        sent.append(json.loads(request.content))
        return httpx.Response(200, json=OPENAI_RESPONSE)

    client = openai.OpenAI(
        api_key="k", base_url="http://gw/v1", http_client=httpx.Client(transport=httpx.MockTransport(answer))
    )
    client.chat.completions.create(model="m", messages=messages)
    return sent[-1]


OPENAI_RESPONSE = {
    "id": "chatcmpl-1", "object": "chat.completion", "created": 1, "model": "m",
    "choices": [{"index": 0, "finish_reason": "stop", "logprobs": None, "message": {
        "role": "assistant", "content": "hello", "refusal": None, "annotations": [], "audio": None,
        "function_call": None, "tool_calls": None}}],
    "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2},
}  # fmt: skip


def test_a_message_the_openai_sdk_serializes_is_accepted() -> None:
    previous = openai.types.chat.ChatCompletion.model_validate(OPENAI_RESPONSE).choices[0].message
    body = sent_by_the_openai_sdk([USER, previous, USER])
    assert body["messages"][1]["refusal"] is None and body["messages"][1]["annotations"] == []
    accepted("chat", body)
    accepted("chat", {**CHAT, "messages": [USER, {**body["messages"][1], "tool_calls": []}, USER]})


def test_a_message_carrying_what_would_be_dropped_is_refused() -> None:
    call = {"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{}"}}
    assistant = {"role": "assistant", "content": None, "tool_calls": [call]}
    err = refused("chat", {**CHAT, "messages": [USER, USER, assistant]})
    assert err["param"] == "messages[2].tool_calls"
    assert "not supported" in err["message"]
    for field, value in (("refusal", "I can't"), ("audio", {"id": "a1"}), ("annotations", [{"type": "url"}])):
        err = refused("chat", {**CHAT, "messages": [{"role": "assistant", "content": "x", field: value}]})
        assert err["param"] == f"messages[0].{field}"


def test_the_schema_refuses_what_the_models_refuse() -> None:
    for model, ok in ((ChatCompletionRequest, CHAT), (CompletionRequest, COMPLETION)):
        schema = model.model_json_schema()
        assert schema["additionalProperties"] is False
        v = jsonschema.Draft202012Validator(schema)
        assert v.is_valid(ok) and v.is_valid({**ok, "best_of": 1, "top_k": -1})
        assert not v.is_valid({**ok, "top_k": 50}) and not v.is_valid({**ok, "temprature": 1})
        with pytest.raises(ValidationError):
            model.model_validate({**ok, "top_k": 50})
    v = jsonschema.Draft202012Validator(ChatCompletionRequest.model_json_schema())
    assert v.is_valid({**CHAT, **HARMLESS_CHAT})
    assert v.is_valid({**CHAT, "messages": [OPENAI_RESPONSE["choices"][0]["message"]]})  # type: ignore[index]
