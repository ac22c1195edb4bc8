"""The engine: continuous batching over a paged KV cache, one background thread per engine.

Its public surface is what callers (the HTTP layer, offline generation, benchmarks) use; the
scheduler, runner and output processing behind it are internal. Imports no FastAPI.
"""
from service.engine.config import EngineConfig
from service.engine.engine import Engine
from service.engine.errors import ContextLengthError, EngineDeadError, QueueFullError, RequestError, RequestTimeoutError
from service.engine.observer import EngineObserver, EngineStats
from service.engine.outputs import RequestOutput

__all__ = ["ContextLengthError", "Engine", "EngineConfig", "EngineDeadError", "EngineObserver", "EngineStats", "QueueFullError",
           "RequestError", "RequestOutput", "RequestTimeoutError"]
