"""uvicorn's HTTP/1.1 protocol (h11) with a deadline for a request's line and headers.

uvicorn closes a connection that idles after a response (`timeout_keep_alive`), but it waits
forever for the first request on a new connection, and any byte of a slowly dripped request
line or header block cancels the keep-alive timer: a few hundred such connections (slowloris)
hold the server's sockets and memory for as long as the client likes. Here the request line and
headers must arrive within `read_timeout` seconds of the connection opening, or of the previous
response ending; otherwise the connection is closed. The body has its own deadline in the request
pipeline (service.api.pipeline: 408 when it is not complete in time), where the answer can still
be an error body. This module knows uvicorn, not FastAPI.
"""
from __future__ import annotations

import asyncio
import logging
from typing import Any

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

log = logging.getLogger("kvserve.server")


def protocol_with_read_timeout(read_timeout: float) -> type[H11Protocol]:
    """An H11Protocol class whose connections get `read_timeout` seconds to send each request's headers."""

    class TimedH11Protocol(H11Protocol):
        _headers_deadline: asyncio.TimerHandle | None = None

        def connection_made(self, transport: Any) -> None:
            super().connection_made(transport)
            self._arm()

        def on_response_complete(self) -> None:
            super().on_response_complete()
            if not self.transport.is_closing() and self.conn.their_state is h11.IDLE:
                self._arm()  # the next request's headers, on a kept-alive connection

        def handle_events(self) -> None:
            super().handle_events()
            if self.conn.their_state is not h11.IDLE:  # a request line and its headers are in
                self._disarm()

        def connection_lost(self, exc: Exception | None) -> None:
            self._disarm()
            super().connection_lost(exc)

        def _arm(self) -> None:
            self._disarm()
            self._headers_deadline = self.loop.call_later(read_timeout, self._headers_too_slow)

        def _disarm(self) -> None:
            if self._headers_deadline is not None:
                self._headers_deadline.cancel()
                self._headers_deadline = None

        def _headers_too_slow(self) -> None:
            self._headers_deadline = None
            if not self.transport.is_closing() and self.conn.their_state is h11.IDLE:
                log.debug("closing a connection whose request headers took over %gs", read_timeout)
                self.transport.close()

    return TimedH11Protocol
