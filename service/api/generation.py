"""One HTTP request's engine requests: submitted, and merged into one stream of outputs.

An HTTP request asks for n choices of one or more prompts; each choice is its own engine request,
with the id `<request id>-<i>`. `submit` waits until the engine has accepted every choice (so
submission errors, the engine's validation and a full queue included, become an answer before
anything is sent) and, for a JSON answer, until each choice's first output too (so an engine error
or a timeout before the first token is a status code as well); a stream starts once the choices are
accepted, however long the prefill takes. `run_to_end` collects everything for a JSON answer. Every failure is an
APIError; whatever has not finished when a Generation closes is aborted, which frees its KV blocks.
No FastAPI here.
"""
from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Mapping
from functools import partial

from starlette.types import Receive

from model.sampling_params import SamplingParams
from service.api.disconnect import unless_disconnected
from service.api.errors import bad_request, failed, unavailable
from service.api.request_context import current_record
from service.engine import Engine, EngineDeadError, QueueFullError, RequestError, RequestOutput, RequestTimeoutError

_ACCEPTED = object()  # queued by a choice when the engine takes it, before any of its outputs


def new_request_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


class Generation:
    """The engine requests behind one HTTP request (n choices x prompts), merged into one stream of
    (choice index, output). `start()` raises submission errors before anything is answered."""

    def __init__(self, engine: Engine, prompts: list[list[int]], params: list[SamplingParams], request_id: str,
                 cache_salt: bytes | None = None):
        self.engine = engine
        self.request_id = request_id
        self.ids = [f"{request_id}-{i}" for i in range(len(prompts))]
        self._queue: asyncio.Queue = asyncio.Queue()
        self._record = current_record.get()  # the HTTP request's access-log record, if any
        self._pumps = [asyncio.ensure_future(self._pump(i, engine.generate(
                           p, sp, rid, cache_salt=cache_salt, accepted=partial(self._queue.put_nowait, (i, _ACCEPTED)))))
                       for i, (p, sp, rid) in enumerate(zip(prompts, params, self.ids))]
        self._ready: list[tuple[int, RequestOutput]] = []
        self.finished = [False] * len(prompts)

    async def _pump(self, index: int, outputs: AsyncIterator[RequestOutput]) -> None:
        try:
            async for out in outputs:
                if self._record is not None:
                    self._record.note(self.engine.name, out)
                self._queue.put_nowait((index, out))
        except Exception as exc:  # submission errors (queue full, ...) reach start() this way
            self._queue.put_nowait((index, exc))

    async def start(self, *, first_outputs: bool = True) -> list[RequestOutput]:
        """Waits until the engine accepted every choice (its refusals raised as they are) and, with
        `first_outputs`, for every choice's first output; returns the first outputs it waited for."""
        accepted: set[int] = set()
        firsts: dict[int, RequestOutput] = {}
        while len(accepted) < len(self.ids) or (first_outputs and len(firsts) < len(self.ids)):
            index, item = await self._queue.get()
            if isinstance(item, Exception):
                self.close()
                raise item
            if item is _ACCEPTED:
                accepted.add(index)
                continue
            firsts.setdefault(index, item)
            self._ready.append((index, item))
        return [firsts[i] for i in sorted(firsts)]

    async def events(self) -> AsyncIterator[tuple[int, RequestOutput]]:
        """Every output until all choices finish (those start() saw come first)."""
        try:
            while not all(self.finished):
                index, item = self._ready.pop(0) if self._ready else await self._queue.get()
                if isinstance(item, Exception):
                    raise item
                self.finished[index] = item.finished
                yield index, item
        finally:
            self.close()

    def close(self) -> None:
        """Stop everything unfinished; the engine frees its blocks within one step."""
        for pump in self._pumps:
            pump.cancel()
        for rid, done in zip(self.ids, self.finished):
            if not done:
                self.engine.abort(rid)


async def submit(variant: str, engine: Engine, prompts: list[list[int]], params: list[SamplingParams], prefix: str,
                 names: Mapping[str, str], cache_salt: bytes | None = None, *,
                 first_outputs: bool = True) -> tuple[Generation, list[RequestOutput]]:
    """A Generation the engine accepted and, with `first_outputs`, every choice's first output; or the
    APIError to answer instead. The engine validates each request (`names`: the endpoint's names
    for the engine's fields)."""
    gen = Generation(engine, prompts, params, new_request_id(prefix), cache_salt)
    try:
        firsts = await gen.start(first_outputs=first_outputs)
    except QueueFullError as exc:
        raise unavailable(f"server busy: {exc}; retry later", "queue_full", "queue_full", variant) from None
    except EngineDeadError as exc:
        raise unavailable(str(exc), "engine_unavailable", "draining", variant) from None
    except RequestTimeoutError as exc:  # as a timeout before the first token (errors.failed)
        raise unavailable(str(exc), "timeout", None, variant, retry_after_s=exc.waited_s) from None
    except RequestError as exc:
        raise bad_request(exc, variant, names) from None
    except BaseException:
        gen.close()
        raise
    error = failed(firsts)
    if error is not None:
        gen.close()
        raise error
    return gen, firsts


async def run_to_end(receive: Receive, variant: str, engine: Engine, prompts: list[list[int]],
                     params: list[SamplingParams], prefix: str, names: Mapping[str, str],
                     cache_salt: bytes | None = None) -> tuple[list[list[RequestOutput]], str]:
    """Non-streaming: every output of every choice, or an error; aborted if the client leaves
    (`receive`: the request's ASGI receive channel)."""
    async def collect() -> tuple[list[list[RequestOutput]], str]:
        gen, _ = await submit(variant, engine, prompts, params, prefix, names, cache_salt)
        outputs: list[list[RequestOutput]] = [[] for _ in prompts]
        async for index, out in gen.events():
            outputs[index].append(out)
        return outputs, gen.request_id

    outputs, rid = await unless_disconnected(receive, collect())
    error = failed([outs[-1] for outs in outputs])
    if error is not None:
        raise error
    return outputs, rid
