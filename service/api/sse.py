"""Server-sent events that stop, and abort their engine requests, the moment the client leaves,
and that keep a silent stream alive with comments.

A streaming answer starts as soon as the engine has accepted its requests, which can be long
before the first token (a long prefill, a full batch). While nothing is ready the stream sends an
SSE comment, `: keep-alive`, every `keep_alive_s` seconds, so proxies and clients with read
timeouts see bytes; clients skip comments (the SSE spec; openai's and huggingface_hub's readers do).
"""
from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable

from starlette.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

from service.api.disconnect import wait_for_disconnect

KEEP_ALIVE = b": keep-alive\n\n"


class EventStream(StreamingResponse):
    """SSE from an async iterator of ready-framed events. Watches the receive channel while it
    streams: on `http.disconnect` it stops the iterator; `on_close` then aborts whatever is unfinished.
    Whenever `keep_alive_s` seconds pass without an event, it sends KEEP_ALIVE."""

    def __init__(self, events: AsyncIterator[bytes], on_close: Callable[[], None], *, keep_alive_s: float):
        super().__init__(events, media_type="text/event-stream",
                         headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        self.events = events
        self.on_close = on_close
        self.keep_alive_s = keep_alive_s

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await send({"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers})

        async def body(chunk: bytes) -> None:
            await send({"type": "http.response.body", "body": chunk, "more_body": True})

        async def stream() -> None:
            while True:
                # the next event runs as a task of its own, so waiting for it can time out without
                # cancelling it: the event iterator is never interrupted mid-way by a keep-alive
                pending = asyncio.ensure_future(anext(self.events))
                try:
                    while not (await asyncio.wait({pending}, timeout=self.keep_alive_s))[0]:
                        await body(KEEP_ALIVE)
                    chunk = pending.result()
                except StopAsyncIteration:
                    break
                finally:
                    if not pending.done():  # the client left, or sending failed
                        pending.cancel()
                        await asyncio.gather(pending, return_exceptions=True)
                await body(chunk)
            await send({"type": "http.response.body", "body": b"", "more_body": False})

        streamer = asyncio.ensure_future(stream())
        watcher = asyncio.ensure_future(wait_for_disconnect(receive))
        try:
            await asyncio.wait({streamer, watcher}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            watcher.cancel()
            if not streamer.done():
                streamer.cancel()
            await asyncio.gather(streamer, watcher, return_exceptions=True)
            self.on_close()  # aborts whatever has not finished: the client is gone or the stream broke
            aclose = getattr(self.events, "aclose", None)
            if aclose is not None:
                await aclose()
        if not streamer.cancelled() and (error := streamer.exception()) is not None:
            raise error  # a bug mid-stream: uvicorn logs it and closes the connection
