"""Errors in OpenAI's shape, ``{"error": {"message", "type", "param", "code"}}``, with the
status its SDKs map to their exception classes."""

from __future__ import annotations

from starlette.responses import JSONResponse

from service.errors import (
    ContextOverflow,
    Draining,
    InvalidParams,
    ModelError,
    QueueFull,
    ServiceError,
    StoreUnavailable,
    TooManyRequests,
)


class ApiError(Exception):
    def __init__(
        self, status: int, message: str, *, kind: str, code: str | None = None, param: str | None = None
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.kind = kind
        self.code = code
        self.param = param

    def response(self) -> JSONResponse:
        body = {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}
        return JSONResponse(body, self.status)


def bad_request(message: str, param: str | None = None, code: str | None = "invalid_value") -> ApiError:
    return ApiError(400, message, kind="invalid_request_error", param=param, code=code)


def unsupported(param: str, what: str | None = None) -> ApiError:
    return bad_request(f"{what or param} is not supported by this server", param, "unsupported_parameter")


def unauthorized() -> ApiError:
    return ApiError(
        401,
        "missing or invalid API key: send 'Authorization: Bearer <token>' with a token from 'users add'",
        kind="invalid_request_error",
        code="invalid_api_key",
    )


def model_not_found(model: str) -> ApiError:
    return ApiError(
        404,
        f"the model {model!r} does not exist; GET /v1/models lists the available ones",
        kind="invalid_request_error",
        param="model",
        code="model_not_found",
    )


def from_service(exc: ServiceError, prompt_param: str) -> ApiError:
    """The chat core's and the engine's refusals as API errors."""
    if isinstance(exc, InvalidParams):
        return bad_request(str(exc))
    if isinstance(exc, ContextOverflow):
        return bad_request(str(exc), prompt_param, "context_length_exceeded")
    if isinstance(exc, TooManyRequests):
        return ApiError(429, str(exc), kind="rate_limit_error", code="too_many_requests")
    if isinstance(exc, QueueFull | Draining):
        return ApiError(
            503, f"the server is overloaded: {exc}; try again", kind="server_error", code="overloaded"
        )
    if isinstance(exc, StoreUnavailable):
        return ApiError(503, "the database is unavailable; try again shortly", kind="server_error")
    if isinstance(exc, ModelError):
        return ApiError(503, str(exc), kind="server_error", code="model_unavailable")
    return ApiError(500, "internal error; see the server log", kind="server_error")
