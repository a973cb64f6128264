"""The one table from gRPC status to HTTP status and OpenAI error shape.

Exceptions become gRPC codes in one place already (`services.common.errors.status_for`); the
HTTP front goes exception -> gRPC code -> this table, so both front doors agree on what an error
is. The body is OpenAI's: {"error": {"message", "type", "param", "code"}}.
"""

import math
from typing import NamedTuple

import grpc

from services.common.errors import status_for


class HttpError(NamedTuple):
    status: int
    type: str
    code: str


HTTP_ERRORS: dict[grpc.StatusCode, HttpError] = {
    grpc.StatusCode.INVALID_ARGUMENT: HttpError(400, "invalid_request_error", "invalid_argument"),
    grpc.StatusCode.FAILED_PRECONDITION: HttpError(400, "invalid_request_error", "failed_precondition"),
    grpc.StatusCode.UNAUTHENTICATED: HttpError(401, "authentication_error", "invalid_api_key"),
    grpc.StatusCode.PERMISSION_DENIED: HttpError(403, "permission_error", "permission_denied"),
    grpc.StatusCode.NOT_FOUND: HttpError(404, "not_found_error", "not_found"),
    grpc.StatusCode.RESOURCE_EXHAUSTED: HttpError(429, "rate_limit_error", "resource_exhausted"),
    grpc.StatusCode.CANCELLED: HttpError(499, "cancelled", "cancelled"),
    grpc.StatusCode.UNAVAILABLE: HttpError(503, "service_unavailable", "unavailable"),
    grpc.StatusCode.DEADLINE_EXCEEDED: HttpError(504, "timeout_error", "deadline_exceeded"),
}
INTERNAL = HttpError(500, "internal_error", "internal")


class ErrorReply(NamedTuple):
    status: int
    body: dict
    headers: dict[str, str]


def error_body(message: str, error: HttpError, param: str | None = None, code: str | None = None) -> dict:
    return {"error": {"message": message, "type": error.type, "param": param, "code": code or error.code}}


def reply_for_code(code: grpc.StatusCode, message: str, retry_after_s: float | None = None,
                   param: str | None = None, error_code: str | None = None) -> ErrorReply:
    error = HTTP_ERRORS.get(code, INTERNAL)
    headers = {}
    if code == grpc.StatusCode.RESOURCE_EXHAUSTED:
        retry = 1.0 if retry_after_s is None else retry_after_s
        # Retry-After is whole seconds (RFC 9110); the openai client reads retry-after-ms first.
        headers = {"Retry-After": str(max(1, math.ceil(retry))), "retry-after-ms": str(int(retry * 1000))}
    return ErrorReply(error.status, error_body(message, error, param, error_code), headers)


def reply_for_exception(exc: BaseException) -> ErrorReply:
    code = status_for(exc)
    message = str(exc) or type(exc).__name__
    if code == grpc.StatusCode.INTERNAL:
        message = f"internal error: {type(exc).__name__}: {message}"
    return reply_for_code(code, message, getattr(exc, "retry_after_s", None))
