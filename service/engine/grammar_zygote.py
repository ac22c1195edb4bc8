"""The grammar zygote: a process that compiles each structured-output spec in a forked child it can kill.

xgrammar (0.2.9) cannot stop a compile once it has started: no timeout, no cancel, and the C++ work
runs with the GIL released, so a thread can only be abandoned, never stopped. A hostile schema of a
few dozen bytes compiles for minutes and a large one takes gigabytes (issue 21). So a spec is first
compiled here, in a child process forked for it, which is SIGKILLed at its deadline or when the
server cancels it, and whose address space is capped (RLIMIT_AS) so it cannot take the machine's
memory; only a spec proven to compile in time is then compiled in the server (service.engine.
grammar_workers). Forking from this process, which has already imported xgrammar and built the
vocabulary's TokenizerInfo, costs milliseconds; a fresh Python process would take seconds, and
xgrammar's serialized CompiledGrammar is no way back either (measured: 1 GB of JSON and minutes
for a schema that compiles in a second), hence the second compile in the server.

The server runs `python -m service.engine.grammar_zygote` and talks JSON lines over its stdin/stdout:
in, first `{"vocab": [hex bytes of each token], "vocab_size", "stop_token_ids"}`, then `{"op": "compile", "id", "kind", "value",
"strict", "timeout", "memory"}` or `{"op": "cancel", "id"}`; out, `{"ready": true}`, then one
`{"id", "status", "message", "seconds"}` per job, status one of ok | invalid | timeout | memory |
crashed | cancelled, written only once the child has been reaped: an answer means it is gone. At
end of stdin (the server closed it, or died) every child is killed and the zygote exits; a child
also dies with the zygote (PR_SET_PDEATHSIG).
"""
from __future__ import annotations

import json
import os
import select
import signal
import sys
import time
from dataclasses import dataclass
from typing import Any

_PR_SET_PDEATHSIG = 1
_MESSAGE_CHARS = 2000
# A compile still running after _RENICE_AFTER_S (a small schema takes a few ms to a tenth of a
# second) yields the CPU to the engine and the event loop: a burst of hostile schemas must not slow
# generation, while small schemas still compile at full priority.
_RENICE_AFTER_S = 0.5
_NICENESS = 10


def die_with_parent() -> None:
    """SIGKILL this process when its parent exits (Linux; elsewhere a no-op)."""
    try:
        import ctypes
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    except (OSError, AttributeError):
        pass


def _address_space() -> int | None:
    """This process's mapped bytes (VmSize), or None where /proc does not tell."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[0]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError):
        return None


def _compile_in_child(info: Any, job: dict, wfd: int) -> None:
    """In the forked child: compile under the memory cap, write one JSON result to `wfd`, exit."""
    import resource

    from service.engine.structured_output import compile_spec
    die_with_parent()
    devnull = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):  # xgrammar's warnings about a user's schema are no log lines of ours
        os.dup2(devnull, fd)
    mapped = _address_space()
    if mapped is not None:
        resource.setrlimit(resource.RLIMIT_AS, (mapped + int(job["memory"]), resource.RLIM_INFINITY))
    started = time.monotonic()
    try:
        import xgrammar as xgr
        compiler = xgr.GrammarCompiler(info, max_threads=1, cache_enabled=False)
        compile_spec(compiler, job["kind"], job["value"], bool(job.get("strict")))
        result: dict[str, object] = {"status": "ok", "message": ""}
    except MemoryError:
        result = {"status": "memory", "message": ""}
    except ValueError as exc:  # RequestError: the spec is invalid
        result = {"status": "invalid", "message": str(exc)[:_MESSAGE_CHARS]}
    except BaseException as exc:  # noqa: BLE001  # anything else: reported, the child exits either way
        result = {"status": "crashed", "message": f"{type(exc).__name__}: {exc}"[:_MESSAGE_CHARS]}
    result["seconds"] = time.monotonic() - started
    os.write(wfd, json.dumps(result).encode())
    os._exit(0)


@dataclass(slots=True)
class _Child:
    id: int
    pid: int
    rfd: int
    deadline: float
    started: float
    out: bytes = b""
    ended_by: str | None = None   # "timeout" | "cancelled": the zygote killed it
    reniced: bool = False


class Zygote:
    def __init__(self, info: Any, out_fd: int):
        self.info, self.out_fd = info, out_fd
        self.children: dict[int, _Child] = {}   # job id -> its live child
        self.pending = b""

    def send(self, message: dict) -> None:
        data = (json.dumps(message) + "\n").encode()
        while data:
            data = data[os.write(self.out_fd, data):]

    def start(self, job: dict) -> None:
        rfd, wfd = os.pipe()
        pid = os.fork()
        if pid == 0:  # pragma: no cover  (the child)
            try:
                os.close(rfd)
                os.close(self.out_fd)
                _compile_in_child(self.info, job, wfd)
            finally:
                os._exit(1)
        os.close(wfd)
        now = time.monotonic()
        self.children[job["id"]] = _Child(job["id"], pid, rfd, now + float(job["timeout"]), now)

    def kill(self, child: _Child, reason: str) -> None:
        if child.ended_by is None:
            child.ended_by = reason
            try:
                os.kill(child.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass

    def renice(self, child: _Child) -> None:
        child.reniced = True
        try:
            os.setpriority(os.PRIO_PROCESS, child.pid, _NICENESS)
        except (ProcessLookupError, PermissionError):
            pass

    def finish(self, child: _Child) -> None:
        """The child's pipe closed: reap it, then answer its job."""
        _, status = os.waitpid(child.pid, 0)
        os.close(child.rfd)
        del self.children[child.id]
        seconds = time.monotonic() - child.started
        try:
            result = json.loads(child.out) if child.out else None
        except ValueError:
            result = None
        if child.ended_by == "cancelled" or (child.ended_by == "timeout" and (result or {}).get("status") != "ok"):
            result = {"status": child.ended_by, "message": ""}
        elif result is None:
            how = f"signal {-os.waitstatus_to_exitcode(status)}" if os.WIFSIGNALED(status) \
                else f"status {os.waitstatus_to_exitcode(status)}"
            # killed by the kernel for memory, or C++ abort on a failed allocation under RLIMIT_AS
            result = {"status": "crashed", "message": f"the compiler process ended with {how}"}
        self.send({"id": child.id, "seconds": seconds, **result})

    def handle(self, line: bytes) -> None:
        msg = json.loads(line)
        if msg.get("op") == "compile":
            self.start(msg)
        elif msg.get("op") == "cancel" and msg.get("id") in self.children:
            self.kill(self.children[msg["id"]], "cancelled")

    def run(self) -> None:
        while True:
            now = time.monotonic()
            for child in list(self.children.values()):
                if child.ended_by is None and now >= child.deadline:
                    self.kill(child, "timeout")
                elif not child.reniced and now >= child.started + _RENICE_AFTER_S:
                    self.renice(child)
            live = [c.deadline - now for c in self.children.values() if c.ended_by is None]
            live += [c.started + _RENICE_AFTER_S - now for c in self.children.values() if not c.reniced]
            wait = max(0.0, min(live)) if live else None
            readable, _, _ = select.select([0, *(c.rfd for c in self.children.values())], [], [], wait)
            by_fd = {c.rfd: c for c in self.children.values()}
            for fd in readable:
                if fd == 0:
                    data = os.read(0, 1 << 20)
                    if not data:
                        return self.stop()
                    self.pending += data
                    *lines, self.pending = self.pending.split(b"\n")
                    for line in lines:
                        if line.strip():
                            self.handle(line)
                    continue
                if fd not in by_fd:
                    continue
                child = by_fd[fd]
                chunk = os.read(fd, 1 << 16)
                if chunk:
                    child.out += chunk
                else:
                    self.finish(child)

    def stop(self) -> None:
        for child in list(self.children.values()):
            self.kill(child, "cancelled")
        for child in list(self.children.values()):
            os.waitpid(child.pid, 0)


def main() -> None:
    # No PR_SET_PDEATHSIG here: it fires when the *thread* that started us ends, and the server may
    # start us from any thread. The server's death closes our stdin, which ends us (run, stop).
    for sig in (signal.SIGINT, signal.SIGTERM):  # a signal to the whole group: the server drains, then ends us
        signal.signal(sig, signal.SIG_IGN)
    out_fd = os.dup(1)
    os.dup2(2, 1)  # whatever an import prints goes to stderr, never into the protocol
    first = b""
    while not first.endswith(b"\n"):
        chunk = os.read(0, 1 << 20)
        if not chunk:
            return
        first += chunk
    head, _, rest = first.partition(b"\n")
    from service.engine.structured_output import tokenizer_info  # xgrammar too: imported once, not per child
    vocab = json.loads(head)
    zygote = Zygote(tokenizer_info([bytes.fromhex(t) for t in vocab["vocab"]], vocab["vocab_size"],
                                   vocab["stop_token_ids"]), out_fd)
    zygote.pending = rest
    zygote.send({"ready": True})
    *lines, zygote.pending = zygote.pending.split(b"\n")
    for line in lines:
        if line.strip():
            zygote.handle(line)
    zygote.run()


if __name__ == "__main__":
    main()
    sys.exit(0)
