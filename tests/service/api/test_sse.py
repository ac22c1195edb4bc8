"""EventStream on its own, driven through ASGI by hand: keep-alive comments while the events are
silent (then every event, in order), and a client that leaves during the silence stops the event
iterator and closes the stream. Event-driven: the fake client reacts to what it was sent."""
from __future__ import annotations

import asyncio

from service.api.sse import KEEP_ALIVE, EventStream


def serve(events, send_hook, receive):
    """Run one EventStream to its end; (every ASGI message sent, how often on_close ran)."""
    sent: list[dict] = []
    closed: list[bool] = []

    async def send(message: dict) -> None:
        sent.append(message)
        send_hook(sent)

    async def main() -> None:
        stream = EventStream(events, lambda: closed.append(True), keep_alive_s=0.001)
        await stream({"type": "http"}, receive, send)

    asyncio.run(main())
    return sent, len(closed)


def keep_alives(sent: list[dict]) -> int:
    return sum(m.get("body") == KEEP_ALIVE for m in sent)


def test_comments_keep_a_silent_stream_alive_until_its_events_come():
    ready = asyncio.Event()

    async def events():
        await ready.wait()  # nothing to send until the client has seen three keep-alives
        yield b"data: 1\n\n"
        yield b"data: 2\n\n"

    async def receive():  # the client stays
        await asyncio.Event().wait()

    def hook(sent):
        if keep_alives(sent) == 3:
            ready.set()

    sent, closed = serve(events(), hook, receive)
    assert sent[0]["type"] == "http.response.start" and sent[0]["status"] == 200
    assert dict(sent[0]["headers"])[b"content-type"].startswith(b"text/event-stream")
    bodies = [m["body"] for m in sent[1:]]
    assert bodies[:3] == [KEEP_ALIVE] * 3
    assert [b for b in bodies if b != KEEP_ALIVE] == [b"data: 1\n\n", b"data: 2\n\n", b""]
    assert sent[-1] == {"type": "http.response.body", "body": b"", "more_body": False}
    assert closed == 1


def test_a_client_leaving_during_the_silence_stops_the_events_and_closes_the_stream():
    gone = asyncio.Event()
    stopped: list[str] = []

    async def events():
        try:
            await asyncio.Event().wait()  # never ready
            yield b"data: never\n\n"
        finally:
            stopped.append("events")

    async def receive():
        await gone.wait()
        return {"type": "http.disconnect"}

    def hook(sent):
        if keep_alives(sent) == 2:
            gone.set()

    sent, closed = serve(events(), hook, receive)
    assert stopped == ["events"] and closed == 1
    assert all(m["body"] == KEEP_ALIVE for m in sent[1:]) and keep_alives(sent) >= 2
