"""The server's side of the grammar zygote: a compile budget, fairness between specs, cancellation.

`CompileWorkers.submit(spec)` has the zygote (service.engine.grammar_zygote) compile a spec in a
child process it kills at the budget (`timeout` seconds of wall clock) or past its memory cap
(`memory` bytes of address space), and returns a job whose future holds the verdict. Rules:

- at most `workers` children compile at once, and at most as many specs wait for one. Every child
  ends within the budget, so a waiting spec starts within one budget; past that, new specs are
  refused (CompilerBusyError: a 503 to retry). A slow compile therefore holds nobody for longer
  than the budget, and while a worker is free nobody at all: each child is a process of its own,
  sharing the CPU with the others as an equal, so a small schema next to two slow ones still
  compiles in its usual tenth of a second.
- equal specs in flight share one child (twenty copies of one hostile schema cost one compile);
- a job whose last waiter leaves (its request timed out, its client disconnected) is cancelled:
  its child is killed, or its place in line given up;
- the zygote starts on the first spec (importing xgrammar: seconds, not counted in any budget),
  and again after it died. Its answers come after the child was reaped, so `outcomes` counts
  children that are really gone.
"""
from __future__ import annotations

import asyncio
import itertools
import json
import logging
import os
import queue
import subprocess
import sys
import threading
from collections import Counter, deque
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

from model.sampling_params import StructuredOutput
from service.engine.errors import QueueFullError

log = logging.getLogger("kvserve.engine")
T = TypeVar("T")
_STOP_WAIT_S = 5.0


class CompilerBusyError(QueueFullError):
    """Every compile worker is busy and as many specs wait already (503 with Retry-After)."""


@dataclass(frozen=True, slots=True)
class CompileBudget:
    """What one spec's compile may take: wall-clock seconds, address-space bytes, and how many compile at once."""
    timeout: float = 5.0
    memory: int = 512 << 20
    workers: int = 4

    def __post_init__(self) -> None:
        for name, ok in (("timeout", self.timeout > 0), ("memory", self.memory >= 16 << 20), ("workers", self.workers >= 1)):
            if not ok:
                raise ValueError(f"grammar compile {name}={getattr(self, name)!r} is out of range")


@dataclass(frozen=True, slots=True)
class Verdict:
    """How a spec's compile in the zygote ended: ok | invalid | timeout | memory | crashed | cancelled | unavailable."""
    status: str
    message: str = ""
    seconds: float = 0.0


@dataclass(eq=False, slots=True)
class CompileJob:
    id: int
    key: bytes
    spec: StructuredOutput
    future: Future = field(default_factory=Future)
    waiters: int = 1
    started: bool = False


class CompileWorkers:
    def __init__(self, tokenizer: Callable[[], dict], budget: CompileBudget):
        self.tokenizer, self.budget = tokenizer, budget  # tokenizer(): the zygote's first message
        self.outcomes: Counter[str] = Counter()   # verdicts by status, as the zygote reported them
        self._lock = threading.Lock()
        self._ids = itertools.count(1)
        self._jobs: dict[bytes, CompileJob] = {}     # by spec key: in flight (running or waiting)
        self._by_id: dict[int, CompileJob] = {}
        self._running: set[int] = set()
        self._waiting: deque[CompileJob] = deque()
        self._proc: subprocess.Popen | None = None
        self._outbox: queue.Queue[dict | None] | None = None
        self._closed = False

    @property
    def pid(self) -> int | None:
        """The zygote's process id while it runs (tests look for its children)."""
        proc = self._proc
        return proc.pid if proc is not None and proc.poll() is None else None

    @property
    def in_flight(self) -> int:
        with self._lock:
            return len(self._running) + len(self._waiting)

    def submit(self, spec: StructuredOutput, key: bytes) -> CompileJob:
        """A job compiling `spec` (or the one already in flight for it); CompilerBusyError when full."""
        with self._lock:
            if self._closed:
                raise CompilerBusyError("the grammar compiler is shut down")
            job = self._jobs.get(key)
            if job is not None:
                job.waiters += 1
                return job
            workers = self.budget.workers
            if len(self._running) >= workers and len(self._waiting) >= workers:
                raise CompilerBusyError(f"{workers} grammars are compiling and {workers} more wait "
                                        "(--grammar-compile-workers)")
            job = CompileJob(next(self._ids), key, spec)
            self._jobs[key] = job
            self._by_id[job.id] = job
            if len(self._running) < workers:
                self._start(job)
            else:
                self._waiting.append(job)
            return job

    def release(self, job: CompileJob) -> None:
        """One waiter of `job` is done with it; when the last leaves before the verdict, it is cancelled."""
        with self._lock:
            job.waiters -= 1
            if job.waiters > 0 or job.future.done():
                return
            if self._jobs.get(job.key) is job:
                del self._jobs[job.key]
            if job.started:  # the zygote kills the child; its "cancelled" answer frees the worker
                self._send({"op": "cancel", "id": job.id})
            else:
                self._waiting.remove(job)
                del self._by_id[job.id]
                job.future.set_result(Verdict("cancelled"))

    # ---- the zygote ----

    def _start(self, job: CompileJob) -> None:  # under the lock
        self._ensure_zygote()
        job.started = True
        self._running.add(job.id)
        spec = job.spec
        self._send({"op": "compile", "id": job.id, "kind": spec.kind, "value": spec.value, "strict": spec.strict,
                    "timeout": self.budget.timeout, "memory": self.budget.memory})

    def _send(self, message: dict) -> None:
        if self._outbox is not None:
            self._outbox.put(message)

    def _ensure_zygote(self) -> None:  # under the lock
        if self._proc is not None:
            return
        import service
        root = str(Path(service.__file__).resolve().parents[1])
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH")) if p)}
        proc = subprocess.Popen([sys.executable, "-m", "service.engine.grammar_zygote"], stdin=subprocess.PIPE,
                                stdout=subprocess.PIPE, env=env)
        outbox: queue.Queue[dict | None] = queue.Queue()
        outbox.put(self.tokenizer())
        self._proc, self._outbox = proc, outbox
        threading.Thread(target=self._write, args=(proc, outbox), name="kvserve-grammar-out", daemon=True).start()
        threading.Thread(target=self._read, args=(proc,), name="kvserve-grammar-in", daemon=True).start()
        log.info("grammar compile zygote started (pid %d)", proc.pid)

    @staticmethod
    def _write(proc: subprocess.Popen, outbox: queue.Queue) -> None:
        """Sends the outbox's messages in order (a pipe write may block: never under the lock)."""
        assert proc.stdin is not None
        try:
            while (message := outbox.get()) is not None:
                proc.stdin.write((json.dumps(message) + "\n").encode())
                proc.stdin.flush()
        except (BrokenPipeError, OSError):
            pass
        finally:
            try:
                proc.stdin.close()  # end of input: the zygote kills its children and exits
            except OSError:
                pass

    def _read(self, proc: subprocess.Popen) -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            try:
                message = json.loads(line)
            except ValueError:
                log.error("grammar compile zygote wrote %r", line[:200])
                continue
            if "id" in message:
                self._answered(message["id"], Verdict(message["status"], message.get("message", ""),
                                                      float(message.get("seconds", 0.0))))
        proc.wait()
        with self._lock:  # it exited: every job it had ends, the next spec starts a new one
            if self._proc is proc:
                self._proc = None
                if self._outbox is not None:
                    self._outbox.put(None)
                self._outbox = None
            lost = [self._by_id[i] for i in list(self._running)]
        if lost and not self._closed:
            log.error("grammar compile zygote exited (status %s) with %d compiles running", proc.returncode, len(lost))
        for job in lost:
            self._answered(job.id, Verdict("unavailable", "the grammar compiler process exited"))

    def _answered(self, job_id: int, verdict: Verdict) -> None:
        with self._lock:
            job = self._by_id.pop(job_id, None)
            if job is None:
                return
            self._running.discard(job_id)
            if self._jobs.get(job.key) is job:
                del self._jobs[job.key]
            self.outcomes[verdict.status] += 1
            while self._waiting and len(self._running) < self.budget.workers and not self._closed:
                self._start(self._waiting.popleft())
        if not job.future.done():
            job.future.set_result(verdict)

    def close(self) -> None:
        """Every job ends (cancelled), every child and the zygote exit; no new job is taken."""
        with self._lock:
            self._closed = True
            waiting, self._waiting = list(self._waiting), deque()
            proc, outbox = self._proc, self._outbox
            if outbox is not None:
                outbox.put(None)  # the zygote reads end of input: kills its children, reaps them, exits
        for job in waiting:
            self._by_id.pop(job.id, None)
            if not job.future.done():
                job.future.set_result(Verdict("unavailable", "the server is shutting down"))
        if proc is not None:
            try:
                proc.wait(_STOP_WAIT_S)
            except subprocess.TimeoutExpired:
                proc.kill()  # its children die with it (PR_SET_PDEATHSIG)
                proc.wait()


async def wait_for(future: Future[T]) -> T:
    """`future`'s result, awaited on this loop; cancelling the caller leaves `future` alone (it may be shared)."""
    loop = asyncio.get_running_loop()
    waiter: asyncio.Future[None] = loop.create_future()

    def set_once() -> None:
        if not waiter.done():
            waiter.set_result(None)

    def wake(_: Future) -> None:
        try:
            loop.call_soon_threadsafe(set_once)
        except RuntimeError:  # the loop is closed: nobody waits any more
            pass

    future.add_done_callback(wake)
    await waiter
    return future.result()


async def in_daemon_thread(fn: Callable[[], T]) -> T:
    """fn() on a daemon thread of its own (never one the interpreter waits for at exit)."""
    future: Future[T] = Future()

    def run() -> None:
        try:
            future.set_result(fn())
        except BaseException as exc:  # noqa: BLE001  # handed to the awaiting caller
            future.set_exception(exc)

    threading.Thread(target=run, name="kvserve-grammar", daemon=True).start()
    return await wait_for(future)
