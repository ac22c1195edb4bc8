"""Errors a caller of the engine can see; the API maps each to an HTTP status."""
from __future__ import annotations


class RequestError(ValueError):
    """The request can never be served as asked (400). `param` names the offending field."""

    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.param = param


class ContextLengthError(RequestError):
    """The prompt, or prompt + max_tokens, does not fit in max_model_len (400, context_length_exceeded)."""


class QueueFullError(RuntimeError):
    """The waiting queue is at --max-queue (503 with Retry-After)."""


class EngineDeadError(RuntimeError):
    """The engine loop is not running: stopped, draining or crashed (503)."""


class RequestTimeoutError(RuntimeError):
    """--request-timeout passed before the engine took the request (its grammar was still compiling): 503."""

    def __init__(self, message: str, waited_s: float):
        super().__init__(message)
        self.waited_s = waited_s
