"""Offline generation on the real engine: `LLM(model, tokenizer).generate(prompts, params)`.

A thin synchronous loop over `Engine`, in the spirit of nano-vllm's `LLM.generate`: every prompt
becomes an engine request, the engine thread schedules, batches and samples them exactly as it does
behind the HTTP server (paged KV cache, every sampling parameter, stop strings, seeds), and the
call returns once all of them have finished. `kvserve generate` and the offline benchmarks use it.
The no-cache forward (`Transformer.forward(ids[B, T])`) is not a generation path: it stays the
reference the tests compare against. Call from synchronous code (it runs its own event loop).
"""
from __future__ import annotations

import asyncio
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from model.sampling_params import SamplingParams, TokenLogprob
from model.tokenizer import Tokenizer
from model.transformer import Transformer
from service.engine.config import EngineConfig
from service.engine.engine import Engine

DEFAULT_KV_CACHE_MEMORY = 256 << 20
GREEDY = SamplingParams(temperature=0.0, max_tokens=64)


@dataclass(slots=True)
class Completion:
    """One finished request: every sampled token (a final EOS included) and the text as served
    (without the EOS or a matched stop string)."""
    prompt_token_ids: list[int]
    token_ids: list[int]
    text: str
    finish_reason: str
    num_cached_tokens: int
    logprobs: list[TokenLogprob] | None


class LLM:
    """An engine of its own, started on first use; `close()` (or `with LLM(...)`) stops it."""

    def __init__(self, model: Transformer, tokenizer: Tokenizer, config: EngineConfig | None = None):
        self.tokenizer = tokenizer
        self.engine = Engine(model, tokenizer, config or EngineConfig(kv_cache_memory=DEFAULT_KV_CACHE_MEMORY))
        self._next_id = 0

    def __enter__(self) -> LLM:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self.engine.shutdown(timeout=10.0)

    def generate(self, prompts: Sequence[str | Sequence[int]],
                 params: SamplingParams | Sequence[SamplingParams] = GREEDY) -> list[Completion]:
        """One Completion per prompt (text is encoded with the checkpoint's special tokens, e.g. BOS).

        `params` is shared by every prompt or given per prompt (default: greedy, 64 tokens). A request
        the engine refuses (`Engine.validate`, run once per request by `Engine.generate`) raises its
        RequestError; the other requests of the call are then aborted."""
        ids = [self.tokenizer.encode(p) if isinstance(p, str) else list(p) for p in prompts]
        per_prompt = [params] * len(ids) if isinstance(params, SamplingParams) else list(params)
        if len(per_prompt) != len(ids):
            raise ValueError(f"{len(per_prompt)} SamplingParams for {len(ids)} prompts: give one, or one per prompt")
        self.engine.start()
        return asyncio.run(self._run(ids, per_prompt))

    def chat(self, conversations: Sequence[Sequence[Mapping[str, Any]]],
             params: SamplingParams | Sequence[SamplingParams] = GREEDY) -> list[Completion]:
        """The assistant's reply to each conversation (a list of {"role", "content"} messages)."""
        # the template writes the control tokens; message content stays text
        prompts = [self.tokenizer.encode_chat(c, add_generation_prompt=True) for c in conversations]
        return self.generate(prompts, params)

    async def _run(self, prompts: list[list[int]], params: list[SamplingParams]) -> list[Completion]:
        async def one(prompt: list[int], sp: SamplingParams) -> Completion:
            self._next_id += 1
            token_ids: list[int] = []
            text: list[str] = []
            logprobs: list[TokenLogprob] = []
            outputs = self.engine.generate(prompt, sp, f"llm-{self._next_id}")
            async for out in outputs:
                token_ids += out.new_token_ids
                text.append(out.new_text)
                logprobs += out.logprobs or []
                if out.finish_reason is not None:
                    break
            if out.finish_reason in (None, "error"):
                raise RuntimeError(out.error or "generation failed")
            return Completion(prompt, token_ids, "".join(text), out.finish_reason, out.num_cached_tokens,
                              logprobs if sp.logprobs is not None else None)

        return list(await asyncio.gather(*(one(p, sp) for p, sp in zip(prompts, params))))
