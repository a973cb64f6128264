"""Typed errors of the engine. Servicers map them once to gRPC status codes:
InvalidRequestError -> INVALID_ARGUMENT, CapacityError -> RESOURCE_EXHAUSTED,
UnknownRequestError -> NOT_FOUND. Messages say what to fix."""


class EngineError(Exception):
    """Base of every error the engine raises on purpose."""


class InvalidRequestError(EngineError, ValueError):
    """The request is malformed (empty prompt, token id out of range, too long, duplicate id);
    retrying it unchanged will fail again."""


class CapacityError(EngineError):
    """The request can never fit this engine's KV pool, whatever else is running."""


class UnknownRequestError(EngineError, LookupError):
    """No request (or no reservation / kept KV) with this id exists (any more)."""


class StepInterrupted(EngineError):
    """Raised by the model between two layers when the step in flight is to be abandoned (a more
    urgent request arrived); the engine catches it and nothing of the step advances."""
