"""The engine: one background thread owns the model, the KV cache and every tensor, and steps.

Callers on an asyncio loop use `generate()` (an async iterator of RequestOutput) and `abort()`;
both only hand messages to the engine thread through a locked inbox, so torch work never blocks
the event loop. Each step: drain the inbox (new requests, aborts), expire timed-out requests,
schedule, run the model on the flat batch, sample (rows with a grammar or a min_tokens ban under
their token masks; other rows pay nothing for them), then detokenize and deliver outputs back to
each caller's loop with call_soon_threadsafe. A structured-output request's grammar is compiled
before it is queued, off the engine thread and within the compile budget (service.engine.structured_output).
A failure is kept to the request it belongs to: a batched forward that raises is retried one
request at a time, a batch whose sampling raises is sampled row by row (service.engine.isolated_step),
and output processing runs per request, so only the request that breaks ends with finish_reason
"error"; the loop keeps serving. Each engine measures at start which thread count and which decode
attention form suit small steps (service.engine.step_threads, service.engine.decode_path).
Nothing here is global: several engines (one per attention variant) can live in one process.
"""
from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import deque
from collections.abc import AsyncIterator, Callable, Sequence

import torch

from kvcache.kv_cache import KVCache
from kvcache.manager import KVCacheManager
from model.sampler import Sampler
from model.sampling_params import SamplingParams, StructuredOutput
from model.tokenizer import Tokenizer
from model.transformer import Transformer
from service.engine.config import EngineConfig
from service.engine.decode_path import measure_sdpa_decode_seqs
from service.engine.errors import ContextLengthError, EngineDeadError, QueueFullError, RequestError, RequestTimeoutError
from service.engine.grammar_workers import CompileBudget
from service.engine.isolated_step import IsolatedStep
from service.engine.observer import EngineObserver, EngineStats
from service.engine.output_processor import OutputProcessor
from service.engine.outputs import RequestOutput
from service.engine.request import Request
from service.engine.runner import ModelRunner
from service.engine.scheduler import Scheduler, SchedulerOutput
from service.engine.step_threads import measure_single_thread_tokens
from service.engine.structured_output import GrammarCompiler, TokenMatcher

log = logging.getLogger("kvserve.engine")
_IDLE_WAIT_S = 0.05


def resolve_max_model_len(requested: int | None, context: int, capacity: int) -> int:
    """min(model context, KV capacity) by default; an explicit value beyond either is refused."""
    if requested is None:
        return min(context, capacity)
    if requested > capacity:
        raise ValueError(f"max_model_len={requested} exceeds the KV cache capacity of {capacity} tokens: "
                         "raise kv_cache_memory or lower max_model_len")
    if requested > context:
        raise ValueError(f"max_model_len={requested} exceeds the model's context of {context} tokens")
    return requested


def _too_long(limit: int) -> str:
    """The first sentence of OpenAI's context-length error, by which client libraries recognise it
    (litellm's ContextWindowExceededError, LangChain's context overflow)."""
    return f"This model's maximum context length is {limit} tokens."


class Engine:
    def __init__(self, model: Transformer, tokenizer: Tokenizer, config: EngineConfig, *, name: str = "native",
                 observer: EngineObserver | None = None):
        self.name = name
        self.model = model
        self.tokenizer = tokenizer
        self.config = config
        self.observer = observer or EngineObserver()
        self.kv_cache = KVCache.for_model(model.config, budget_bytes=config.kv_cache_memory,
                                          block_size=config.block_size, dtype=model.dtype, device=model.device)
        self.layout = self.kv_cache.layout
        self.max_model_len = resolve_max_model_len(config.max_model_len, model.config.max_seq_len,
                                                   self.kv_cache.capacity_tokens)
        self.kv_manager = KVCacheManager(self.kv_cache.num_blocks, config.block_size,
                                         enable_prefix_caching=config.enable_prefix_caching)
        self.scheduler = Scheduler(self.kv_manager, max_num_seqs=config.max_num_seqs,
                                   max_num_batched_tokens=config.max_num_batched_tokens)
        self.runner = ModelRunner(model, self.kv_cache, self.kv_manager)
        # torch's per-thread count starts from whatever any thread set last (an earlier engine's one-thread
        # step included), so the engine thread sets its count itself: the configured one, else the count
        # of the thread that builds the engine.
        self._threads = config.num_threads or torch.get_num_threads()
        self._step_threads = self._threads
        self._single_thread_tokens = 0              # steps of at most this many tokens run on one thread
        self.sampler = Sampler()
        self.outputs = OutputProcessor(tokenizer, self.max_model_len)
        self.grammars = GrammarCompiler(tokenizer, self.vocab_size, budget=CompileBudget(
            config.grammar_compile_timeout, config.grammar_compile_memory, config.grammar_compile_workers))
        self._compiling = 0                    # requests whose grammar is compiling (not yet in _live)
        self.step_work = IsolatedStep(self.runner, self.sampler, self.grammars,
                                      lambda req, error: self._finish(req, "error", error=error), name)
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._inbox: deque[Request | str] = deque()  # a new request, or the id of one to abort
        self._live: dict[str, Request] = {}    # submitted, not finished (guarded by _lock)
        self._requests: dict[str, Request] = {}  # the engine thread's own view
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._crashed: BaseException | None = None
        self._stats = self._snapshot()

    # ---- caller side (any thread / event loop) ----

    @property
    def is_alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive() and not self._stop.is_set()

    @property
    def num_unfinished(self) -> int:
        with self._lock:
            return len(self._live) + self._compiling

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, name=f"kvserve-engine-{self.name}", daemon=True)
            self._thread.start()

    def shutdown(self, timeout: float | None = None) -> None:
        """Stop the loop; requests still unfinished end with finish_reason "abort"."""
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout)
        self.grammars.close()

    def stats(self) -> EngineStats:
        return self._stats

    @property
    def vocab_size(self) -> int:
        return self.model.config.vocab_size

    def validate(self, prompt_token_ids: Sequence[int], params: SamplingParams) -> None:
        """RequestError (naming the field and the allowed range) for a request this engine can never
        serve; `generate` calls it, so callers only need it to refuse early."""
        limit, vocab = self.max_model_len, self.vocab_size
        prompt_len = len(prompt_token_ids)
        if prompt_len == 0:
            raise RequestError("prompt is empty: it must have at least 1 token", "prompt")
        if prompt_len >= limit:  # before the per-token check: a huge prompt costs nothing to refuse
            raise ContextLengthError(f"{_too_long(limit)} However, the prompt has {prompt_len} tokens; at most "
                                     f"{limit - 1} fit (max_model_len {limit}, one token left for the completion). "
                                     "Please reduce the length of the prompt.", "prompt")
        bad = next((t for t in prompt_token_ids if not 0 <= t < vocab), None)
        if bad is not None:
            raise RequestError(f"prompt token id {bad} is out of range [0, {vocab - 1}]", "prompt")
        if prompt_len + params.max_tokens > limit:
            raise ContextLengthError(f"{_too_long(limit)} However, you requested {prompt_len + params.max_tokens} "
                                     f"tokens ({prompt_len} in the prompt, {params.max_tokens} in the completion): "
                                     f"max_tokens={params.max_tokens} is too large, it must be in "
                                     f"[1, {limit - prompt_len}] (max_model_len {limit}). Please reduce the length "
                                     "of the prompt or completion.", "max_tokens")
        bad = next((t for t in params.stop_token_ids if not 0 <= t < vocab), None)
        if bad is not None:
            raise RequestError(f"stop_token_ids contains {bad}: token ids must be in [0, {vocab - 1}]",
                               "stop_token_ids")

    def abort(self, request_id: str) -> None:
        with self._lock:
            self._inbox.append(request_id)
        self._wake.set()

    async def generate(self, prompt_token_ids: list[int], params: SamplingParams, request_id: str, *,
                       cache_salt: bytes | None = None,
                       accepted: Callable[[], None] | None = None) -> AsyncIterator[RequestOutput]:
        """The request's outputs as they come. `cache_salt`: its prefix-cache tenant (blocks are
        shared only between requests of equal salt; None is the shared default). What the engine
        refuses (RequestError, QueueFullError, EngineDeadError) is raised before anything else
        happens; `accepted()` is called once it has taken the request (validated, grammar compiled,
        queued), from when on every failure comes as an output: a streaming answer can start then,
        without waiting for the first token."""
        self.validate(prompt_token_ids, params)
        # compiled (or found in the cache) off this loop and off the engine thread; RequestError if invalid
        arrival = time.monotonic()
        grammar = None if params.structured_output is None else await self._grammar(params.structured_output)
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[RequestOutput] = asyncio.Queue()

        def on_output(out: RequestOutput) -> None:
            loop.call_soon_threadsafe(queue.put_nowait, out)

        req = self.outputs.new_request(request_id, list(prompt_token_ids), params, arrival, on_output)
        req.cache_salt = cache_salt
        if params.seed is not None:
            req.generator = torch.Generator(device=self.model.device).manual_seed(params.seed)
        req.grammar = grammar
        with self._lock:
            if not self.is_alive:
                raise EngineDeadError(f"engine {self.name!r} is not running")
            if request_id in self._live:
                raise RequestError(f"request_id {request_id!r} is already in use", "request_id")
            # max_queue counts the requests beyond those that can run at once: 0 means no waiting
            if len(self._live) >= self.config.max_num_seqs + self.config.max_queue:
                raise QueueFullError(f"engine {self.name!r} has {len(self._live)} requests in flight: "
                                     f"{self.config.max_num_seqs} run at once (max_num_seqs) and "
                                     f"{self.config.max_queue} may wait (max_queue)")
            self._live[request_id] = req
            self._inbox.append(req)
        self._wake.set()
        if accepted is not None:
            accepted()
        finished = False
        try:
            while not finished:
                out = await queue.get()
                finished = out.finished
                yield out
        finally:
            if not finished:
                self.abort(request_id)

    # ---- engine thread ----

    def _loop(self) -> None:
        # OpenMP's thread count belongs to the calling thread: set it here, after torch's lazy
        # per-thread initialisation (which get_num_threads triggers) so that cannot undo it.
        torch.get_num_threads()
        torch.set_num_threads(self._threads)
        try:
            small = self.config.single_thread_tokens
            self._single_thread_tokens = (measure_single_thread_tokens(self.model, self.kv_cache, self._threads)
                                          if small is None else small)
            sdpa = self.config.sdpa_decode_seqs if self.model.attention == "flash" else 0  # flash's other form only
            self.runner.sdpa_decode_seqs = (measure_sdpa_decode_seqs(self.model, self.kv_cache, self._threads_for)
                                            if sdpa is None else sdpa)
            while not self._stop.is_set():
                self._wake.clear()
                self._drain_inbox()
                self._expire_timeouts()
                if self.scheduler.has_unfinished():
                    self._step()
                else:
                    self._stats = self._snapshot()
                    self._wake.wait(_IDLE_WAIT_S if self.config.request_timeout else None)
        except BaseException as exc:  # the loop itself broke: fail everything, report dead
            self._crashed = exc
            log.exception("engine %s crashed", self.name)
            self._stop.set()
            self._finish_all("error", f"engine crashed: {exc}")
        else:
            self._drain_inbox()
            self._finish_all("abort", None)
        self._stats = self._snapshot()  # alive=False from now on

    async def _grammar(self, spec: StructuredOutput) -> TokenMatcher:
        """The request's matcher, its compile within the grammar budget and within the request's own
        timeout (counted from its arrival, which is now): past it the compile is cancelled."""
        timeout = self.config.request_timeout
        self._compiling += 1
        try:
            async with asyncio.timeout(timeout):
                return await self.grammars.matcher(spec)
        except TimeoutError:
            raise RequestTimeoutError(f"request timed out after {timeout:g}s while its grammar compiled",
                                      waited_s=timeout or 0.0) from None
        finally:
            self._compiling -= 1

    def _drain_inbox(self) -> None:
        with self._lock:
            items = list(self._inbox)
            self._inbox.clear()
        for item in items:
            if isinstance(item, Request):
                self._requests[item.request_id] = item
                self.scheduler.add(item)
            else:
                req = self._requests.get(item)
                if req is not None and not req.is_finished:
                    self._finish(req, "abort")

    def _expire_timeouts(self) -> None:
        timeout = self.config.request_timeout
        if timeout is None:
            return
        now = time.monotonic()
        for req in [*self.scheduler.running, *self.scheduler.waiting]:
            if now - req.arrival_time > timeout:
                error = None if req.num_output_tokens else f"request timed out after {timeout:g}s before its first token"
                self._finish(req, "timeout", error=error)

    def _step(self) -> None:
        out = self.scheduler.schedule()
        now = time.monotonic()
        self._note_admissions(out, now)
        if not out.scheduled:
            time.sleep(0.001)  # everything runnable was preempted this step; retry
            return
        phase = _phase(out)
        threads = self._threads_for(out.num_tokens)
        if threads != self._step_threads:  # small steps run faster on one thread (service.engine.step_threads)
            torch.set_num_threads(threads)
            self._step_threads = threads
        started = time.perf_counter()
        scheduled, logits = self.step_work.forward(out.scheduled)
        sampling = [s.request for s in scheduled if s.samples]
        tokens, logprobs = self.step_work.sample(logits, sampling)
        self.observer.on_step(phase=phase, duration_s=time.perf_counter() - started,
                              num_tokens=out.num_tokens, num_seqs=len(out.scheduled))
        for s in scheduled:
            req = s.request
            if req.is_finished:  # its sampling failed
                continue
            req.num_computed_tokens += s.num_new_tokens
            self.kv_manager.cache_blocks(req.request_id, req.all_token_ids, req.num_computed_tokens, req.cache_salt)
        now = time.monotonic()
        delivered = []
        prefilled = sum(r.num_prompt_tokens for r in sampling if r.first_token_time is None)
        self.observer.on_tokens(prompt_tokens=prefilled, generation_tokens=len(sampling))
        for req, token, logprob in zip(sampling, tokens, logprobs):
            if token is None:
                continue
            try:
                self._note_token(req, now)
                output = self.outputs.on_token(req, token, logprob, now)
            except Exception as exc:  # this request's text processing broke: it alone fails
                log.exception("output processing failed for request %s in engine %s", req.request_id, self.name)
                self._finish(req, "error", error=f"internal error while processing the output: {exc}")
                continue
            if output.finish_reason is not None:
                self._retire(req, output.finish_reason, now)
            delivered.append((req, output))
        self._stats = self._snapshot()  # before delivery: a caller that sees its end sees its blocks freed
        for req, output in delivered:
            self._deliver(req, output)

    def _threads_for(self, num_tokens: int) -> int:
        return 1 if num_tokens <= self._single_thread_tokens else self._threads

    def _note_admissions(self, out: SchedulerOutput, now: float) -> None:
        for _ in out.preempted:
            self.observer.on_preemption()
        for req in out.admitted:
            if req.first_scheduled_time is None:
                req.first_scheduled_time = now
            self.observer.on_prefix_lookup(queried_tokens=req.num_tokens, hit_tokens=req.num_computed_tokens)

    def _note_token(self, req: Request, now: float) -> None:
        if req.last_token_time is None:
            req.first_token_time = now
            self.observer.on_first_token(ttft_s=now - req.arrival_time,
                                         queue_time_s=(req.first_scheduled_time or now) - req.arrival_time)
        else:
            self.observer.on_inter_token(latency_s=now - req.last_token_time)
        req.last_token_time = now

    def _finish(self, req: Request, reason: str, error: str | None = None) -> None:
        """End a request that did not finish by sampling (abort, timeout, error)."""
        now = time.monotonic()
        self._retire(req, reason, now)
        self._stats = self._snapshot()
        self._deliver(req, self.outputs.output(req, [], "", reason, now, error=error))

    def _retire(self, req: Request, reason: str, now: float) -> None:
        self.scheduler.finish(req, reason)
        req.grammar = None  # the matcher's memory goes with the request
        self._requests.pop(req.request_id, None)
        with self._lock:
            self._live.pop(req.request_id, None)
        self.observer.on_request_finished(finish_reason=reason, prompt_tokens=req.num_prompt_tokens,
                                          generation_tokens=req.num_output_tokens, e2e_s=now - req.arrival_time)

    def _deliver(self, req: Request, output: RequestOutput) -> None:
        try:
            req.on_output(output)
        except RuntimeError:  # the caller's event loop is gone
            if not req.is_finished:
                self._finish(req, "abort")

    def _finish_all(self, reason: str, error: str | None) -> None:
        for req in list(self._requests.values()):
            if not req.is_finished:
                self._finish(req, reason, error=error)

    def _snapshot(self) -> EngineStats:
        return EngineStats(
            num_running=len(self.scheduler.running), num_waiting=len(self.scheduler.waiting),
            kv=self.kv_manager.stats(),
            bytes_per_token=self.layout.bytes_per_token, bytes_per_block=self.layout.bytes_per_block,
            block_size=self.layout.block_size, capacity_tokens=self.kv_cache.capacity_tokens,
            kv_memory_bytes=self.kv_cache.nbytes, num_preemptions=self.scheduler.num_preemptions,
            alive=self._crashed is None and not self._stop.is_set(),
        )


def _phase(out: SchedulerOutput) -> str:
    decodes = sum(1 for s in out.scheduled if s.request.num_computed_tokens >= s.request.num_prompt_tokens)
    if decodes == len(out.scheduled):
        return "decode"
    return "prefill" if decodes == 0 else "mixed"
