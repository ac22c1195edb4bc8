"""Engine configuration: a frozen dataclass built once at the edge (CLI / env) and passed down."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class EngineConfig:
    kv_cache_memory: int = 1 << 30        # bytes for this engine's K/V pool
    block_size: int = 16
    max_model_len: int | None = None      # None: min(model context, KV capacity in tokens)
    max_num_seqs: int = 64                # running batch cap
    max_num_batched_tokens: int = 1024    # per-step token budget (chunked prefill)
    max_queue: int = 1024                 # requests that may wait beyond the max_num_seqs that run; 0: none
    request_timeout: float | None = None  # seconds from arrival; None = no limit
    enable_prefix_caching: bool = True
    num_threads: int | None = None        # the engine thread's torch threads; None: its builder thread's
    single_thread_tokens: int | None = None  # steps of at most this many tokens run on 1 thread; None: measured
    sdpa_decode_seqs: int | None = None   # pure decode steps of at most this many sequences run in the sdpa
                                          # form of --attention flash; None: measured
    grammar_compile_timeout: float = 5.0  # seconds one structured-output spec may take to compile
    grammar_compile_memory: int = 512 << 20  # bytes of address space one compile may take
    grammar_compile_workers: int = 4      # compiles at once (as many more may wait)

    def __post_init__(self) -> None:
        checks = [
            ("block_size", self.block_size >= 1, ">= 1"),
            ("max_num_seqs", self.max_num_seqs >= 1, ">= 1"),
            ("max_num_batched_tokens", self.max_num_batched_tokens >= 1, ">= 1"),
            ("max_queue", self.max_queue >= 0, ">= 0"),
            ("max_model_len", self.max_model_len is None or self.max_model_len >= 1, ">= 1"),
            ("request_timeout", self.request_timeout is None or self.request_timeout > 0, "> 0"),
            ("num_threads", self.num_threads is None or self.num_threads >= 1, ">= 1"),
            ("single_thread_tokens", self.single_thread_tokens is None or self.single_thread_tokens >= 0, ">= 0"),
            ("sdpa_decode_seqs", self.sdpa_decode_seqs is None or self.sdpa_decode_seqs >= 0, ">= 0"),
            ("grammar_compile_timeout", self.grammar_compile_timeout > 0, "> 0"),
            ("grammar_compile_memory", self.grammar_compile_memory >= 16 << 20, ">= 16 MiB"),
            ("grammar_compile_workers", self.grammar_compile_workers >= 1, ">= 1"),
        ]
        for name, ok, allowed in checks:
            if not ok:
                raise ValueError(f"{name}={getattr(self, name)!r} is out of range: must be {allowed}")
