"""Every error a client can see, as one class tree, and its one rendering to HTTP.

An :class:`APIError`'s instance fields are what the client receives: the HTTP ``status_code``, the
OpenAI ``error_type``, ``code`` and ``param``, and ``headers`` (``Retry-After``, ``x-ratelimit-*``).
A subclass only sets class-level defaults for them; a constructor argument overrides one for that
instance. :meth:`APIError.body` is the OpenAI error body ``{"error": {"message", "type", "param",
"code"}}``. Errors pickle with every field intact, so one raised in the ledger actor or a pool
replica reaches the gateway as it was raised.

::

    APIError                          500 server_error
    ├── InvalidRequestError           400 invalid_request_error
    │   ├── ContextLengthError            code context_length_exceeded
    │   └── InvalidInputError             code invalid_value (admin API, ledger)
    │       └── InvalidMaxTokensError     param max_tokens
    ├── AuthenticationError           401 code invalid_api_key
    ├── PermissionDeniedError         403
    │   └── ModelNotAllowedError          type permission_error, code model_not_allowed, param model
    ├── NotFoundError                 404 code not_found
    ├── ConflictError                 409 code conflict
    │   └── DuplicateRequestError         code duplicate_request_id
    ├── PayloadTooLargeError          413 code payload_too_large
    ├── UnsupportedMediaTypeError     415 code unsupported_media_type
    ├── RateLimitError                429 type and code rate_limit_exceeded
    │   ├── RateLimitExceededError        type "requests" or "tokens" (the exhausted limit)
    │   └── InsufficientQuotaError        type and code insufficient_quota
    ├── ServiceUnavailableError       503 code service_unavailable
    │   ├── LedgerUnavailableError        code ledger_unavailable
    │   ├── GatewayBusyError              code gateway_busy (waited its time at the gateway's fair gate)
    │   └── PoolUnavailableError          code pool_unavailable (a pool with no replica running)
    ├── EngineFailureError            500 code engine_error
    └── AdmissionRefused              429 or 503: serving.admission, beside the ``Refused`` it carries

Failures that are not client errors (a Ray actor died, Serve's back-pressure, an engine died)
become members of the tree in :func:`from_exception`, by ``isinstance`` against one table that also
says which of them another replica may retry (:func:`is_retryable`). :func:`validation_message` is
the one wording of a pydantic validation error, and :func:`error_response` the one rendering to
HTTP, used by the gateway app's handlers (:func:`install_error_handlers`) and the admin router.

The module imports no other Tokenweir module, and neither Ray, vLLM nor Starlette when it is
imported, so every layer (admission, metering, tenancy, gateway) can raise these errors.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from fastapi import FastAPI
    from starlette.requests import Request
    from starlette.responses import JSONResponse

__all__ = [
    "APIError",
    "AuthenticationError",
    "ConflictError",
    "ContextLengthError",
    "DuplicateRequestError",
    "EngineFailureError",
    "GatewayBusyError",
    "InsufficientQuotaError",
    "InvalidInputError",
    "InvalidMaxTokensError",
    "InvalidRequestError",
    "LedgerUnavailableError",
    "ModelNotAllowedError",
    "NotFoundError",
    "PayloadTooLargeError",
    "PermissionDeniedError",
    "PoolUnavailableError",
    "RateLimitError",
    "RateLimitExceededError",
    "ServiceUnavailableError",
    "UnsupportedMediaTypeError",
    "error_response",
    "from_exception",
    "install_error_handlers",
    "is_retryable",
    "validation_message",
]

log = logging.getLogger("tokenweir.http")


class APIError(Exception):
    """An error the client sees; the class attributes are the defaults of the instance's fields."""

    status_code: int = 500
    error_type: str = "server_error"
    """The OpenAI error ``type``."""
    code: str | None = None
    param: str | None = None
    """The request field the error is about."""

    def __init__(
        self,
        message: str,
        *,
        status_code: int | None = None,
        error_type: str | None = None,
        code: str | None = None,
        param: str | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        cls = type(self)
        self.message = message
        self.status_code = cls.status_code if status_code is None else status_code
        self.error_type = cls.error_type if error_type is None else error_type
        self.code = cls.code if code is None else code
        self.param = cls.param if param is None else param
        self.headers: dict[str, str] = dict(headers or {})

    def body(self) -> dict[str, Any]:
        """The OpenAI error body."""
        return {
            "error": {
                "message": self.message,
                "type": self.error_type,
                "param": self.param,
                "code": self.code,
            }
        }

    def __reduce__(self) -> tuple[Any, ...]:
        # Ray pickles exceptions. Rebuild without __init__ (subclass constructors differ), then
        # restore every instance field.
        return (_restore, (type(self), self.message), self.__dict__)


def _restore(cls: type[APIError], message: str) -> APIError:
    return cls.__new__(cls, message)


class InvalidRequestError(APIError):
    """The request is malformed or asks for something impossible (400)."""

    status_code = 400
    error_type = "invalid_request_error"


class ContextLengthError(InvalidRequestError):
    """Prompt plus requested completion exceed the model's length (400)."""

    code = "context_length_exceeded"


class InvalidInputError(InvalidRequestError):
    """A value out of range or malformed: admin API input, or what the ledger cannot grant (400)."""

    code = "invalid_value"


class InvalidMaxTokensError(InvalidInputError):
    """``max_tokens`` above the tenant's per-request cap (400)."""

    param = "max_tokens"


class AuthenticationError(APIError):
    """Missing, unknown or revoked API key, or not the key this surface needs (401)."""

    status_code = 401
    error_type = "invalid_request_error"
    code = "invalid_api_key"


class PermissionDeniedError(APIError):
    """The key may not do this here (403)."""

    status_code = 403
    error_type = "invalid_request_error"


class ModelNotAllowedError(PermissionDeniedError):
    """The tenant may not use this model (403)."""

    error_type = "permission_error"
    code = "model_not_allowed"
    param = "model"


class NotFoundError(APIError):
    """Unknown model, route, tenant or key (404)."""

    status_code = 404
    error_type = "invalid_request_error"
    code = "not_found"


class ConflictError(APIError):
    """The object already exists (409)."""

    status_code = 409
    error_type = "invalid_request_error"
    code = "conflict"


class DuplicateRequestError(ConflictError):
    """A request id that already holds a reservation (409)."""

    code = "duplicate_request_id"


class PayloadTooLargeError(APIError):
    """Body larger than the configured limit (413)."""

    status_code = 413
    error_type = "invalid_request_error"
    code = "payload_too_large"


class UnsupportedMediaTypeError(APIError):
    """A request body that is not JSON (415)."""

    status_code = 415
    error_type = "invalid_request_error"
    code = "unsupported_media_type"


class RateLimitError(APIError):
    """Slow down (429); ``headers`` say when to retry."""

    status_code = 429
    error_type = "rate_limit_exceeded"
    code = "rate_limit_exceeded"


class RateLimitExceededError(RateLimitError):
    """The tenant's requests, tokens or concurrency limit is spent (429). As OpenAI does, the error
    type names the exhausted limit: ``"tokens"``, else ``"requests"``."""

    error_type = "requests"

    def __init__(
        self,
        message: str,
        *,
        limit: str | None = None,
        retry_after_s: float | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(message, error_type="tokens" if limit == "tokens" else "requests", headers=headers)
        self.limit = limit
        """``"requests"``, ``"tokens"`` or ``"concurrency"``."""
        self.retry_after_s = retry_after_s
        """When the limit will allow the request; None when it never will (a request above TPM)."""


class InsufficientQuotaError(RateLimitError):
    """The tenant's balance cannot pay for the request (429)."""

    error_type = "insufficient_quota"
    code = "insufficient_quota"


class ServiceUnavailableError(APIError):
    """No pool can take the request now, or the engine is down (503)."""

    status_code = 503
    error_type = "server_error"
    code = "service_unavailable"


class LedgerUnavailableError(ServiceUnavailableError):
    """The usage ledger cannot be reached, so nothing can be reserved or charged (503)."""

    code = "ledger_unavailable"


class GatewayBusyError(ServiceUnavailableError):
    """The gateway replica's fair gate had no place for the request within its wait (503)."""

    code = "gateway_busy"


class PoolUnavailableError(ServiceUnavailableError):
    """A pool has no replica running: every node of its GPU type is gone, or its replicas are being
    replaced (503). Refused at once, not held until the first-token timeout; ``pool`` names it."""

    code = "pool_unavailable"

    def __init__(self, pool: str) -> None:
        super().__init__(f"pool {pool!r} has no replica running (its nodes are gone or it is starting)")
        self.pool = pool


class EngineFailureError(APIError):
    """The engine failed while serving this request (500)."""

    status_code = 500
    error_type = "server_error"
    code = "engine_error"


# -- failures raised by Ray, Ray Serve and the engines ---------------------------------------------


@dataclass(frozen=True, slots=True)
class _Failure:
    """A failure class, named by module, looked up only in a process that has imported it (an
    instance cannot exist elsewhere): recognising a failure never imports Ray or vLLM."""

    module: str
    name: str
    retryable: bool
    """Another replica may serve the request (when it fails before its first token)."""
    message: str


_REPLICA_GONE = "the model replica is unavailable; retry shortly"
_FAILURES = (
    _Failure("serving.engines.base", "EngineDeadError", True, _REPLICA_GONE),
    _Failure("vllm.v1.engine.exceptions", "EngineDeadError", True, _REPLICA_GONE),
    # ActorDiedError and ActorUnavailableError are RayActorErrors.
    _Failure("ray.exceptions", "RayActorError", True, _REPLICA_GONE),
    _Failure(
        "ray.serve.exceptions", "BackPressureError", False, "the model pool is saturated; retry shortly"
    ),
)


def _loaded(module: str, name: str) -> type[BaseException] | None:
    cls = getattr(sys.modules.get(module), name, None)
    return cls if isinstance(cls, type) and issubclass(cls, BaseException) else None


def _cause(e: BaseException) -> BaseException:
    """What the remote side raised, out of Ray's ``RayTaskError``. (A ``RayTaskError(X)`` is also an
    ``X``, but it reads X's class defaults, not the fields of the error that was raised.)"""
    task_error = _loaded("ray.exceptions", "RayTaskError")
    while task_error is not None and isinstance(e, task_error):
        cause = getattr(e, "cause", None)
        if not isinstance(cause, BaseException):
            break
        e = cause
    return e


def _failure(e: BaseException) -> _Failure | None:
    for f in _FAILURES:
        cls = _loaded(f.module, f.name)
        if cls is not None and isinstance(e, cls):
            return f
    return None


def from_exception(e: BaseException) -> APIError:
    """The client-visible error for what a pool call raised: the error itself when it is one of
    ours (also out of Ray's wrapper), a 503 with ``Retry-After: 1`` for a failure in the table, else
    a 500 ``engine_error``."""
    e = _cause(e)
    if isinstance(e, APIError):
        return e
    f = _failure(e)
    if f is None:
        return EngineFailureError("the engine failed while serving this request")
    return ServiceUnavailableError(f.message, headers={"Retry-After": "1"})


def is_retryable(e: BaseException) -> bool:
    """Whether another replica may serve a request that failed so (a replica or engine death; never
    a refusal or other client-visible error)."""
    f = _failure(_cause(e))
    return f is not None and f.retryable


# -- validation and HTTP ---------------------------------------------------------------------------


def validation_message(error: Mapping[str, Any], *, show_input: bool = False) -> tuple[str, str | None]:
    """One pydantic error (an item of ``ValidationError.errors()``) as ``(message, param)``.

    The message is ``"<dotted location>: <pydantic's message>"`` (only the message for a check on
    the whole object), a validator's text without pydantic's ``"Value error, "``; ``show_input``
    adds the offending value, ``" (got ...)"``, except after a validator's text, which names its
    own values. ``param`` is the top-level field, or None.
    """
    loc = tuple(error.get("loc") or ())
    msg = str(error.get("msg", "")).removeprefix("Value error, ")
    text = f"{'.'.join(str(x) for x in loc)}: {msg}" if loc else msg
    if show_input and error.get("type") != "value_error" and "input" in error:
        text += f" (got {error['input']!r})"
    return text, (str(loc[0]) if loc else None)


def error_response(e: APIError) -> JSONResponse:
    """The one rendering of a client-visible error as an HTTP response."""
    from starlette.responses import JSONResponse

    return JSONResponse(e.body(), status_code=e.status_code, headers=e.headers)


def install_error_handlers(app: FastAPI) -> None:
    """OpenAI-shaped bodies for every error of ``app``, including Starlette's own 404/405, FastAPI's
    request validation and crashes (logged; no traceback leaves the process)."""
    from fastapi.exceptions import RequestValidationError
    from starlette.exceptions import HTTPException

    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError) -> JSONResponse:
        return error_response(exc)

    @app.exception_handler(HTTPException)
    async def _http_error(request: Request, exc: HTTPException) -> JSONResponse:
        if exc.status_code == 404:
            return error_response(NotFoundError(f"no route {request.method} {request.url.path}"))
        return error_response(
            InvalidRequestError(str(exc.detail), code="http_error", status_code=exc.status_code)
        )

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        message, param = validation_message(exc.errors()[0])
        return error_response(InvalidRequestError(message, param=param))

    @app.exception_handler(Exception)
    async def _crash(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error on %s", request.url.path)
        return error_response(
            APIError("internal error; the request was not completed", code="internal_error")
        )
