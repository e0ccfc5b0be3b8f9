"""The one way a route reads a JSON request body: the OpenAI routes and the admin API alike.

Within a size limit (the declared length, then what arrives), of a JSON media type (or none
declared), and JSON that is also text: no ``NaN`` or ``Infinity``, no nesting deeper than the
parser can take, no lone UTF-16 surrogate. Anything else is a 4xx with the OpenAI error body, never
an exception that reaches the app's crash handler.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

from serving.errors import InvalidRequestError, PayloadTooLargeError, UnsupportedMediaTypeError

if TYPE_CHECKING:
    from starlette.requests import Request

__all__ = ["parse_json", "read_body"]


async def read_body(request: Request, max_body_bytes: int) -> bytes:
    """The raw body, refused (413) past ``max_body_bytes`` before more of it is read."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > max_body_bytes:
        raise PayloadTooLargeError(
            f"request body of {declared} bytes exceeds the limit of {max_body_bytes} bytes"
        )
    chunks, size = [], 0
    async for part in request.stream():
        size += len(part)
        if size > max_body_bytes:
            raise PayloadTooLargeError(f"request body exceeds the limit of {max_body_bytes} bytes")
        chunks.append(part)
    return b"".join(chunks)


def parse_json(raw: bytes, content_type: str | None) -> Any:
    """The JSON value of a request body sent with ``content_type``; raises a 4xx
    :class:`serving.errors.APIError`."""
    if content_type is not None and not _is_json(content_type):
        raise UnsupportedMediaTypeError(
            f"unsupported content type {content_type[:100]!r}: send the body as JSON with "
            "'Content-Type: application/json'"
        )
    if not raw:
        raise InvalidRequestError("request body is empty; expected a JSON object")
    try:
        body = json.loads(raw, parse_constant=_no_constant)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise InvalidRequestError(f"request body is not valid JSON: {e}") from e
    except RecursionError as e:
        raise InvalidRequestError("request body is nested too deeply") from e
    # A lone UTF-16 surrogate ("\ud800") is valid JSON but not text: no tokenizer, log, engine or
    # SQLite can take it. It can only come from a \u escape or a surrogate's UTF-8 form (0xED
    # 0xA0-0xBF, which json.loads lets through: it decodes bytes with "surrogatepass").
    if (b"\\u" in raw or b"\xed" in raw) and _has_lone_surrogate(body):
        raise InvalidRequestError("request body contains a lone UTF-16 surrogate (not valid Unicode text)")
    return body


def _is_json(content_type: str) -> bool:
    media = content_type.partition(";")[0].strip().lower()
    return media == "application/json" or (media.startswith("application/") and media.endswith("+json"))


def _no_constant(name: str) -> Any:
    raise json.JSONDecodeError(f"{name} is not a JSON value", name, 0)


def _has_lone_surrogate(obj: Any) -> bool:
    stack = [obj]
    while stack:
        o = stack.pop()
        if isinstance(o, str):
            try:
                o.encode("utf-8")
            except UnicodeEncodeError:
                return True
        elif isinstance(o, dict):
            stack.extend(o.keys())
            stack.extend(o.values())
        elif isinstance(o, list):
            stack.extend(o)
    return False
