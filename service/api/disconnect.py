"""Noticing that an HTTP client went away, from the ASGI receive channel (`http.disconnect`).

Call these only once the request body has been read: after that, the only message the server
still sends on the channel is the disconnect. No FastAPI here: `receive` is the plain ASGI callable.
"""
from __future__ import annotations

import asyncio


class ClientGone(Exception):
    """The client disconnected before its answer was ready."""


async def wait_for_disconnect(receive) -> None:
    """Returns when the ASGI server reports `http.disconnect` (call only once the body is read)."""
    while (await receive())["type"] != "http.disconnect":
        pass


async def unless_disconnected(receive, coro):
    """The result of `coro`, or ClientGone (with `coro` cancelled) if the client leaves first."""
    task = asyncio.ensure_future(coro)
    watcher = asyncio.ensure_future(wait_for_disconnect(receive))
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
        if not task.done():
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            raise ClientGone()
    return task.result()
