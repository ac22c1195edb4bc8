"""Model runner: turns a scheduled step into tensors, runs the paged forward, returns logits.

Logits are computed for the rows that sample; a request asking for prompt logprobs also gets its
prompt positions' logits, recorded on it (service.engine.prompt_logprobs).

The only place where the scheduler's Python lists become tensors. It owns the KV cache tensors.
"""
from __future__ import annotations

import torch
from torch import Tensor

from kvcache.kv_cache import KVCache
from kvcache.manager import KVCacheManager
from kvcache.metadata import PagedMetadata
from model.transformer import Transformer
from service.engine.prompt_logprobs import positions_needed, record
from service.engine.request import Request
from service.engine.scheduler import ScheduledRequest


class ModelRunner:
    def __init__(self, model: Transformer, kv_cache: KVCache, kv_manager: KVCacheManager):
        self.model = model
        self.kv_cache = kv_cache
        self.kv_manager = kv_manager
        self.device = model.device
        # pure decode steps of up to this many sequences run in the sdpa form (service.engine.decode_path)
        self.sdpa_decode_seqs = 0

    @torch.inference_mode()
    def execute(self, scheduled: list[ScheduledRequest]) -> Tensor:
        """Run one step; logits (float32) for the scheduled requests that sample, in order."""
        input_ids: list[int] = []
        query_lens, context_lens, tables, sample_rows = [], [], [], []
        prompt_rows: list[tuple[Request, range, int]] = []  # (request, positions, first row of the step)
        for item in scheduled:
            req, n = item.request, item.num_new_tokens
            start = req.num_computed_tokens
            positions = positions_needed(req, start, n)
            if positions:
                prompt_rows.append((req, positions, len(input_ids) + positions.start - start))
            input_ids.extend(req.all_token_ids[start:start + n])
            query_lens.append(n)
            context_lens.append(start + n)
            tables.append(self.kv_manager.block_table(req.request_id))
            if item.samples:
                sample_rows.append(len(input_ids) - 1)
        meta = PagedMetadata.build(query_lens=query_lens, context_lens=context_lens, block_tables=tables,
                                   block_size=self.kv_cache.block_size, device=self.device)
        ids = torch.tensor(input_ids, dtype=torch.long, device=self.device)
        rows = torch.tensor(sample_rows, dtype=torch.long, device=self.device)
        decode_only = len(input_ids) == len(scheduled)  # every request brought one token
        attention = "sdpa" if decode_only and len(scheduled) <= self.sdpa_decode_seqs else None
        if not prompt_rows:
            return self.model(ids, kv_cache=self.kv_cache, meta=meta, logits_indices=rows, attention=attention).float()
        h = self.model.hidden_paged(ids, self.kv_cache, meta, attention)
        for req, positions, first in prompt_rows:  # an LM-head call of their own: the sampled rows' is unchanged
            record(req, positions, self.model.logits(h[first:first + len(positions)]).float())
        return self.model.logits(h[rows]).float()
