"""Server-sent events that stop, and abort their engine requests, the moment the client leaves."""
from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable

from starlette.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

from service.api.disconnect import wait_for_disconnect


class EventStream(StreamingResponse):
    """SSE from an async iterator of ready-framed events. Watches the receive channel while it
    streams: on `http.disconnect` it stops the iterator; `on_close` then aborts whatever is unfinished."""

    def __init__(self, events: AsyncIterator[bytes], on_close: Callable[[], None]):
        super().__init__(events, media_type="text/event-stream",
                         headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        self.events = events
        self.on_close = on_close

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await send({"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers})

        async def stream() -> None:
            async for chunk in self.events:
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
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
