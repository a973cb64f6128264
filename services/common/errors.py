"""Domain errors shared by the services, and the one place they become gRPC status codes.

Domain modules raise these (or the engine's / kvtransfer's own typed errors); servicers call
`abort_with(context, exc)`. Messages say what to fix.
"""

import grpc


# The retry hint (trailer `retry-after-ms`) of RESOURCE_EXHAUSTED / UNAVAILABLE without a better one.
DEFAULT_RETRY_AFTER_S = 1.0


class InvalidArgument(ValueError):
    """The request is malformed; retrying it unchanged will fail again."""


class ResourceExhausted(Exception):
    """Over a limit right now; retry after `retry_after_s`."""

    def __init__(self, message: str, retry_after_s: float = 1.0):
        super().__init__(message)
        self.retry_after_s = retry_after_s


class Unavailable(Exception):
    """No worker can take the request right now."""


class NotFound(Exception):
    """A named thing (lease, request) does not exist (any more)."""


class Unauthenticated(Exception):
    """No valid credentials (API key) with the request."""


class PermissionDenied(Exception):
    """Valid credentials that do not allow this request (e.g. another tenant's)."""


class FailedPrecondition(Exception):
    """Two sides disagree (e.g. KV layouts); retrying will not help without a fix."""


def status_for(exc: BaseException) -> grpc.StatusCode:
    from engine.errors import CapacityError, InvalidRequestError, UnknownRequestError
    from kvtransfer.errors import KvIncompatibleError, KvLeaseNotFound, KvTransferError

    table = [
        ((InvalidArgument, InvalidRequestError), grpc.StatusCode.INVALID_ARGUMENT),
        ((ResourceExhausted, CapacityError), grpc.StatusCode.RESOURCE_EXHAUSTED),
        ((NotFound, KvLeaseNotFound, UnknownRequestError), grpc.StatusCode.NOT_FOUND),
        ((FailedPrecondition, KvIncompatibleError), grpc.StatusCode.FAILED_PRECONDITION),
        ((Unauthenticated,), grpc.StatusCode.UNAUTHENTICATED),
        ((PermissionDenied,), grpc.StatusCode.PERMISSION_DENIED),
        ((Unavailable, KvTransferError, ConnectionError), grpc.StatusCode.UNAVAILABLE),
        ((TimeoutError,), grpc.StatusCode.DEADLINE_EXCEEDED),
        ((ValueError,), grpc.StatusCode.INVALID_ARGUMENT),
    ]
    for classes, code in table:
        if isinstance(exc, classes):
            return code
    return grpc.StatusCode.INTERNAL


def status_parts(exc: BaseException) -> tuple[grpc.StatusCode, str, float | None]:
    """(status code, message, retry-after seconds or None) that a request failed by `exc` ends with."""
    code = status_for(exc)
    retry = getattr(exc, "retry_after_s", None)
    if retry is None and code in (grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.UNAVAILABLE):
        retry = DEFAULT_RETRY_AFTER_S  # every "try again later" says when
    message = str(exc) or type(exc).__name__
    if code == grpc.StatusCode.INTERNAL:
        message = f"internal error: {type(exc).__name__}: {message}"
    return code, message, retry


async def abort_with(context: grpc.aio.ServicerContext, exc: BaseException) -> None:
    """Ends the RPC with the status for `exc` (never returns)."""
    code, message, retry = status_parts(exc)
    if retry is not None:
        context.set_trailing_metadata((("retry-after-ms", str(int(retry * 1000))),))
    await context.abort(code, message)
