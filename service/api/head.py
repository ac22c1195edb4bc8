"""HEAD answered wherever GET is: the GET route runs, its status and headers go out, its body does not.

FastAPI's routes take only the methods they name, so `HEAD /` or `HEAD /health` would be 405s
(RFC 9110 asks a server to answer HEAD like GET, without the content). This ASGI middleware hands
a HEAD request to the app as a GET and drops the body it sends; Content-Length stays what GET's
would be. The route the router matched is copied back, so metrics label it as for GET.
"""
from __future__ import annotations


class HeadAsGet:
    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http" or scope["method"] != "HEAD":
            await self.app(scope, receive, send)
            return

        async def headers_only(message) -> None:
            if message["type"] == "http.response.body":
                if message.get("more_body", False):
                    return
                message = {"type": "http.response.body", "body": b"", "more_body": False}
            await send(message)

        as_get = {**scope, "method": "GET"}
        try:
            await self.app(as_get, receive, headers_only)
        finally:
            if "route" in as_get:
                scope["route"] = as_get["route"]
