"""The HTTP layer: the FastAPI app, its routes, request and response bodies, SSE and API errors.

The only package that imports FastAPI. It talks to engines only through their public surface
(`service.engine`).
"""
from service.api.app import create_app
from service.api.state import ServerState

__all__ = ["ServerState", "create_app"]
