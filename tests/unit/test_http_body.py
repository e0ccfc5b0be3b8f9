"""Reading a JSON request body (serving/http_body.py), the one way the OpenAI routes and the admin
API take one: what the fuzz tier found, and the hostile bodies of issue 13, are 4xx errors."""

from __future__ import annotations

import pytest

from serving.errors import APIError
from serving.http_body import parse_json

JSON = "application/json"


@pytest.mark.parametrize(
    "content_type",
    [None, JSON, "application/json; charset=utf-8", "Application/JSON", "application/vnd.x+json"],
)
def test_json_and_undeclared_bodies_are_read(content_type: str | None) -> None:
    assert parse_json(b'{"a": [1, 2.5, "\\ud83d\\ude00"]}', content_type) == {"a": [1, 2.5, "\U0001f600"]}


@pytest.mark.parametrize(
    "content_type", ["text/plain", "application/x-www-form-urlencoded", "multipart/form-data; boundary=x", ""]
)
def test_a_body_that_is_not_declared_json_is_415(content_type: str) -> None:
    with pytest.raises(APIError) as e:
        parse_json(b'{"a": 1}', content_type)
    assert e.value.status_code == 415 and e.value.code == "unsupported_media_type"


@pytest.mark.parametrize(
    ("raw", "fragment"),
    [
        (b"", "empty"),
        (b'{"a": ', "not valid JSON"),
        (b'{"a": "\xff"}', "not valid JSON"),
        (b'{"t": NaN}', "NaN is not a JSON value"),
        (b'{"t": -Infinity}', "-Infinity is not a JSON value"),
        (b'{"a": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", "nested too deeply"),
        (b'{"a": ' * 100_000 + b"1" + b"}" * 100_000, "nested too deeply"),
        (b'{"p": "a\\ud800b"}', "surrogate"),
        (b'{"\\udfff": 1}', "surrogate"),
        (b'{"p": "a\xed\xa0\x80b"}', "surrogate"),
    ],
)
def test_hostile_bodies_are_400(raw: bytes, fragment: str) -> None:
    with pytest.raises(APIError) as e:
        parse_json(raw, JSON)
    assert e.value.status_code == 400 and fragment in e.value.message, e.value.message
