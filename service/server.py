"""Serving: build one engine per attention variant, run uvicorn, drain on SIGTERM.

`ServeOptions` is the frozen configuration the CLI builds; `build_state` loads the checkpoint once
and derives each variant from it (weights that do not change are shared, not copied; a `NAME=DIR`
variant takes only its attention projections from the converted checkpoint DIR), giving each its own
engine and KV pool of the same byte budget; `serve` runs the HTTP server until a signal.
On SIGTERM / SIGINT the server keeps listening but admits nothing (503, /health 503), lets the
in-flight requests finish within `shutdown_timeout`, aborts what is left, and returns 0. A second
signal exits at once.
"""
from __future__ import annotations

import asyncio
import dataclasses
import logging
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import uvicorn

from service.api import ServerState, create_app
from service.api.limits import Limits
from service.engine import Engine, EngineConfig
from service.http_timeouts import protocol_with_read_timeout
from service.metrics import ServerMetrics
from service.stats_log import StatsLogger
from service.threads import ThreadPlan, plan_threads

log = logging.getLogger("kvserve.server")


@dataclass(frozen=True, slots=True)
class ServeOptions:
    model: str = "smollm2-135m"
    variants: tuple[str, ...] = ("native",)
    attention: str = "auto"
    dtype: str = "float32"           # resolved: float32 | bfloat16
    device: str = "cpu"
    quantization: str = "auto"       # auto | none | q4 | int8 | fp16 (model/quantization.py)
    quantization_crossover: int | None = None  # rows; None: measured at load
    engine: EngineConfig = field(default_factory=EngineConfig)
    limits: Limits = field(default_factory=Limits)
    prefix_cache_scope: str = "global"   # or "api-key"
    read_timeout: float = 30.0           # seconds for a request's headers, and again for its body
    keep_alive_timeout: float = 5.0      # seconds an idle kept-alive connection stays open
    api_key: str | None = None
    host: str = "127.0.0.1"
    port: int = 8000
    shutdown_timeout: float = 30.0
    log_level: str = "info"
    threads: int | None = None       # None: the CPUs this process may use (service.threads)
    log_stats_interval: float = 10.0  # seconds between stats lines while busy; 0: none
    served_model_name: str | None = None   # default: from `model`
    chat_template: str | None = None       # a template file replacing the checkpoint's
    allowed_origins: tuple[str, ...] = ()  # CORS; empty = off
    reject_unknown_fields: bool = False
    tool_call_parser: str = "hermes"       # service.api.tool_calls.FORMATS


def served_model_name(source: str) -> str:
    """'tiny' and 'smollm2-135m' as given; a path by its file or directory name without extension."""
    from pathlib import Path
    path = Path(source)
    if path.suffix == ".gguf":
        return path.stem
    return path.name or source


def build_state(opts: ServeOptions) -> ServerState:
    """Load the checkpoint once and build one started engine per variant. ValueError on bad options."""
    from model.chat_template import compile_chat_template
    from model.loader import load_base
    from model.variants import split_variant, with_converted, with_variant

    template = None
    if opts.chat_template is not None:  # read and compiled first: a bad file fails before the slow load
        from pathlib import Path
        try:
            template = Path(opts.chat_template).read_text(encoding="utf-8")
        except OSError as exc:
            raise ValueError(f"--chat-template {opts.chat_template}: {exc.strerror}") from None
        try:
            compile_chat_template(template)
        except ValueError as exc:
            raise ValueError(f"--chat-template {opts.chat_template}: {exc}") from None
    plan = plan_threads(opts.threads, len(opts.variants))
    apply_threads(plan)
    dtype = getattr(torch, opts.dtype)
    # a progress bar is for a person watching a terminal, not for container logs
    base, tokenizer = load_base(opts.model, dtype=dtype, device=opts.device, attention=opts.attention,
                                quantization=opts.quantization, crossover=opts.quantization_crossover,
                                progress=sys.stderr.isatty())
    if template is not None:
        tokenizer = tokenizer.with_chat_template(template)
    name = opts.served_model_name or served_model_name(opts.model)
    metrics = ServerMetrics(model_name=name)
    engines: dict[str, Engine] = {}
    engine_config = dataclasses.replace(opts.engine, num_threads=plan.per_engine)
    for spec in opts.variants:
        variant, path = split_variant(spec)  # NAME=DIR: a converted checkpoint's attention, the rest shared
        if path is not None:
            model = with_converted(base, path, variant)
        else:
            model = base if variant == "native" else with_variant(base, variant)
        engine = Engine(model, tokenizer, engine_config, name=variant, observer=metrics.observer(variant))
        cfg = model.config
        metrics.track(variant, engine.stats, {
            "model": name, "n_heads": cfg.n_heads, "n_kv_heads": cfg.n_kv_heads, "head_dim": cfg.head_dim,
            "n_layers": cfg.n_layers, "dtype": opts.dtype, "attention": model.attention,
            "block_size": engine.layout.block_size, "weights": model.weights}, alive=_liveness(engine))
        engines[variant] = engine
        log.info(footprint_line(engine))
    return ServerState(model_name=name, engines=engines, tokenizer=tokenizer, metrics=metrics, api_key=opts.api_key,
                       allowed_origins=opts.allowed_origins, reject_unknown_fields=opts.reject_unknown_fields,
                       limits=opts.limits, prefix_cache_scope=opts.prefix_cache_scope, read_timeout=opts.read_timeout,
                       tool_call_parser=opts.tool_call_parser)


def _liveness(engine: Engine) -> Callable[[], bool]:
    return lambda: engine.is_alive


def apply_threads(plan: ThreadPlan) -> None:
    """The whole process's count for loading (each engine thread then sets its own share), and one
    inter-op thread: kvserve's engines are its inter-op parallelism, torch's pool would sit idle."""
    torch.set_num_threads(plan.total)
    try:
        torch.set_num_interop_threads(1)
    except RuntimeError:  # already set, or inter-op work already ran in this process (a second server in tests)
        pass
    log.info(plan.describe())


def footprint_line(engine: Engine) -> str:
    """One start-up log line: the KV footprint of a variant."""
    s = engine.stats()
    cfg = engine.model.config
    return (f"variant {engine.name}: n_heads={cfg.n_heads} n_kv_heads={cfg.n_kv_heads} head_dim={cfg.head_dim} "
            f"n_layers={cfg.n_layers} dtype={str(engine.model.dtype).removeprefix('torch.')} weights: {engine.model.weights} | "
            f"KV {s.bytes_per_token} B/token, {s.bytes_per_block} B/block of {s.block_size} tokens, "
            f"{s.kv.num_blocks} blocks = {s.capacity_tokens} tokens capacity in {s.kv_memory_bytes / 2**20:.1f} MiB; "
            f"max_model_len={engine.max_model_len}")


class _DrainingServer(uvicorn.Server):
    """uvicorn that drains instead of stopping on the first SIGTERM / SIGINT."""

    def __init__(self, config: uvicorn.Config, state: ServerState, shutdown_timeout: float):
        super().__init__(config)
        self.state = state
        self.shutdown_timeout = shutdown_timeout
        self._deadline: float | None = None

    def handle_exit(self, sig, frame) -> None:
        # Not recording the signal: uvicorn would re-raise it after serving and the exit status
        # would be the signal's, not 0.
        if self.state.draining or not self.started:
            self.should_exit = True
            self.force_exit = self.state.draining
            return
        self.state.draining = True
        self._deadline = time.monotonic() + self.shutdown_timeout
        log.info("signal %s: draining %d in-flight requests (up to %gs); new requests get 503",
                 sig, self._unfinished(), self.shutdown_timeout)

    def _unfinished(self) -> int:
        return sum(engine.num_unfinished for engine in self.state.engines.values())

    async def startup(self, sockets=None) -> None:
        await super().startup(sockets)
        for server in getattr(self, "servers", []):
            for sock in server.sockets:
                host, port = sock.getsockname()[:2]
                log.info("kvserve listening on http://%s:%d", host, port)

    async def on_tick(self, counter: int) -> bool:
        if self._deadline is not None and not self.should_exit:
            left = self._unfinished()
            if left == 0 or time.monotonic() >= self._deadline:
                if left:
                    log.warning("shutdown timeout: aborting %d unfinished requests", left)
                # stopping the engines ends whatever is left with finish_reason "abort", so every
                # open response completes before uvicorn closes the connections
                await asyncio.to_thread(stop_engines, self.state)
                self.should_exit = True
        return await super().on_tick(counter)


def stop_engines(state: ServerState) -> None:
    for engine in state.engines.values():
        engine.shutdown(timeout=10.0)


def run(state: ServerState, opts: ServeOptions) -> int:
    """Start the engines and serve HTTP until a signal has drained the server. Returns the exit status."""
    for engine in state.engines.values():
        engine.start()
    # log_config=None: uvicorn's loggers propagate to the root handler kvserve configured (one format);
    # the access line comes from service.api.middleware, with the request id and token counts
    config = uvicorn.Config(create_app(state), host=opts.host, port=opts.port, log_level=opts.log_level,
                            log_config=None, access_log=False, lifespan="off", timeout_graceful_shutdown=10,
                            http=protocol_with_read_timeout(opts.read_timeout),
                            timeout_keep_alive=opts.keep_alive_timeout)  # type: ignore[arg-type]  # a float works
    stats = StatsLogger(state.engines, state.metrics, opts.log_stats_interval)
    stats.start()
    try:
        _DrainingServer(config, state, opts.shutdown_timeout).run()
    finally:
        stats.stop()
        stop_engines(state)
    log.info("stopped")
    return 0


def serve(opts: ServeOptions) -> int:
    return run(build_state(opts), opts)
