"""KV cache manager: each sequence's block table over the block pool, with automatic prefix caching.

The scheduler's only view of KV memory. It works on sequence ids, token ids and block ids (no
torch); the runner turns `block_table(seq_id)` into tensors. One admission goes:

    blocks, num_hit = kv.get_computed_blocks(token_ids)        # pure lookup
    if kv.allocate_slots(seq_id, num_hit + num_new, blocks):   # all or nothing
        ...                                                    # the step computes num_new tokens
        kv.cache_blocks(seq_id, token_ids, num_hit + num_new)  # after the step
    ...
    kv.free(seq_id)                                            # finished, aborted or preempted

Decode grows a sequence one slot at a time with `allocate_slots(seq_id, num_tokens + 1)`.

Tokens become *stored* only through `cache_blocks`: it is the one call that says "the K/V of the
first num_computed_tokens are written". Call it after every step that computed tokens, whether or
not prefix caching is on (when off it only records the count). Slots allocated but not yet
reported there count as `empty_slots`, like the unfilled tail of a sequence's last block.
Blocks attached from the prefix cache are full and count as stored at once.

Invariants (checked by property tests in tests/kvcache/test_manager.py):
- free_blocks + used_blocks == num_blocks (usable blocks, the null block excluded);
- a block appears in two block tables only when shared through the prefix cache (it carries a
  hash), and its ref_count equals the number of block tables holding it;
- no allocation ever exceeds the pool: a request that does not fit returns False and changes nothing;
- freeing every sequence returns every block (used_blocks == 0; hashed blocks stay cached);
- stored_tokens + empty_slots == used_blocks * block_size.
"""
from __future__ import annotations

from collections.abc import Hashable, Sequence
from dataclasses import dataclass, field

from kvcache.block_hash import BlockHash, iter_block_hashes, salted_root
from kvcache.block_pool import NULL_BLOCK_ID, Block, BlockPool


@dataclass(frozen=True, slots=True)
class KVCacheUsage:
    num_blocks: int             # usable blocks (the null block excluded)
    free_blocks: int            # never used, freed, or cached (all allocatable)
    used_blocks: int            # referenced by at least one sequence
    cached_blocks: int          # free but still holding a hashed full block (reusable until evicted)
    stored_tokens: int          # tokens whose K/V live in used blocks (shared blocks counted once)
    empty_slots: int            # allocated slots that hold no token yet (internal fragmentation)
    prefix_queries_tokens: int  # cumulative
    prefix_hits_tokens: int     # cumulative

    @property
    def usage_ratio(self) -> float:
        """Fraction of usable blocks referenced by some sequence, 0-1."""
        return self.used_blocks / self.num_blocks if self.num_blocks else 0.0


@dataclass(slots=True)
class _SeqBlocks:
    blocks: list[Block] = field(default_factory=list)
    block_hashes: list[BlockHash] = field(default_factory=list)  # keys of its first full blocks
    num_computed_tokens: int = 0


class KVCacheManager:
    def __init__(self, num_blocks: int, block_size: int = 16, enable_prefix_caching: bool = True):
        """num_blocks counts the null block, like `KVCache.num_blocks`; num_blocks - 1 are usable."""
        if block_size < 1:
            raise ValueError(f"block_size={block_size} is out of range: must be >= 1")
        self.pool = BlockPool(num_blocks)
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self._seqs: dict[Hashable, _SeqBlocks] = {}
        self._prefix_queries_tokens = 0
        self._prefix_hits_tokens = 0

    # --- prefix cache -------------------------------------------------------------------------

    def get_computed_blocks(self, token_ids: Sequence[int], salt: bytes | None = None) -> tuple[list[int], int]:
        """The longest run of cached full blocks that prefixes token_ids, and the tokens they hold.
        Only blocks cached under the same `salt` (see `cache_blocks`) can hit.

        Capped so at least one token is left to compute (its logits are needed to sample): a full
        hit on a 32-token prompt with blocks of 16 returns one block, 16 tokens. Pure lookup; the
        blocks are claimed by passing them to `allocate_slots` before anything else allocates.
        """
        if not self.enable_prefix_caching:
            return [], 0
        max_blocks = max(0, (len(token_ids) - 1) // self.block_size)
        hits: list[int] = []
        for block_hash in iter_block_hashes(token_ids, self.block_size, parent=salted_root(salt), end_block=max_blocks):
            block = self.pool.lookup(block_hash)
            if block is None:
                break
            hits.append(block.block_id)
        return hits, len(hits) * self.block_size

    def record_prefix_lookup(self, queried_tokens: int, hit_tokens: int) -> None:
        """Count one admission's prefix lookup, in tokens (the scheduler calls it once per admission)."""
        if not 0 <= hit_tokens <= queried_tokens:
            raise ValueError(f"hit_tokens={hit_tokens} is out of range: must be in [0, queried_tokens={queried_tokens}]")
        self._prefix_queries_tokens += queried_tokens
        self._prefix_hits_tokens += hit_tokens

    # --- allocation ---------------------------------------------------------------------------

    def can_allocate(self, seq_id: Hashable, num_total_tokens: int, computed_blocks: Sequence[int] = ()) -> bool:
        """Whether `allocate_slots` with the same arguments would succeed now."""
        attach, num_new = self._plan(seq_id, num_total_tokens, computed_blocks)
        return self._fits(attach, num_new)

    def allocate_slots(self, seq_id: Hashable, num_total_tokens: int, computed_blocks: Sequence[int] = ()) -> bool:
        """Make seq_id's block table cover its first num_total_tokens tokens; all or nothing.

        computed_blocks (from `get_computed_blocks`, first allocation only) are shared, not
        copied: their ref_count goes up and unreferenced ones leave the evictable set, so they
        count against the free blocks. Returns False and changes nothing when the pool is short.
        """
        attach, num_new = self._plan(seq_id, num_total_tokens, computed_blocks)
        if not self._fits(attach, num_new):
            return False
        if not attach and not num_new:
            return True
        # Claim the hits before allocating, so the allocation cannot evict them.
        self.pool.touch(attach)
        seq = self._seqs.get(seq_id)
        if seq is None:
            seq = self._seqs[seq_id] = _SeqBlocks(
                block_hashes=[b.cached_hash for b in attach], num_computed_tokens=len(attach) * self.block_size)
        seq.blocks.extend(attach)
        seq.blocks.extend(self.pool.allocate(num_new))
        return True

    def _plan(self, seq_id: Hashable, num_total_tokens: int, computed_blocks: Sequence[int]) -> tuple[list[Block], int]:
        """Blocks to attach from the prefix cache and the number of fresh blocks to allocate."""
        if num_total_tokens < 0:
            raise ValueError(f"num_total_tokens={num_total_tokens} is out of range: must be >= 0")
        seq = self._seqs.get(seq_id)
        attach: list[Block] = []
        if computed_blocks:
            if not self.enable_prefix_caching:
                raise ValueError("computed_blocks were given but prefix caching is disabled")
            if seq is not None:
                raise ValueError(f"sequence {seq_id!r} already has blocks: computed_blocks attach only at its first allocation")
            if len(computed_blocks) * self.block_size > num_total_tokens:
                raise ValueError(f"{len(computed_blocks)} computed blocks hold more than num_total_tokens={num_total_tokens}")
            if len(set(computed_blocks)) != len(computed_blocks):
                raise ValueError(f"computed_blocks {list(computed_blocks)} repeat a block")
            for block_id in computed_blocks:
                if not NULL_BLOCK_ID < block_id <= self.pool.num_blocks:
                    raise ValueError(f"block id {block_id} is out of range: must be in [1, {self.pool.num_blocks}]")
                block = self.pool.blocks[block_id]
                if block.block_hash is None:
                    raise ValueError(f"block {block_id} is not in the prefix cache (evicted?): "
                                     "pass what get_computed_blocks just returned")
                attach.append(block)
        held = len(seq.blocks) if seq is not None else 0
        num_new = max(0, -(-num_total_tokens // self.block_size) - held - len(attach))
        return attach, num_new

    def _fits(self, attach: list[Block], num_new: int) -> bool:
        revived = sum(1 for b in attach if b.ref_count == 0)  # cached blocks taken off the free list
        return num_new + revived <= self.pool.num_free_blocks

    # --- after a step -------------------------------------------------------------------------

    def cache_blocks(self, seq_id: Hashable, token_ids: Sequence[int], num_computed_tokens: int,
                     salt: bytes | None = None) -> None:
        """Record that the K/V of seq_id's first num_computed_tokens of token_ids are written.

        Fills the blocks' token counts (what `stats` reports as stored) and, with prefix caching
        on, registers every newly full block under its chained hash, salted with `salt` (pass the
        same salt every time, and to `get_computed_blocks`). If an identical block is already
        registered, that entry is kept and this sequence keeps its own (unhashed) block.
        """
        seq = self._seqs.get(seq_id)
        if seq is None:
            raise ValueError(f"sequence {seq_id!r} holds no blocks: allocate_slots first")
        capacity = len(seq.blocks) * self.block_size
        if not seq.num_computed_tokens <= num_computed_tokens <= min(len(token_ids), capacity):
            raise ValueError(
                f"num_computed_tokens={num_computed_tokens} is out of range: must be in "
                f"[{seq.num_computed_tokens}, {min(len(token_ids), capacity)}] (already computed, "
                f"min(len(token_ids)={len(token_ids)}, allocated slots={capacity}))")
        bs = self.block_size
        for i in range(seq.num_computed_tokens // bs, -(-num_computed_tokens // bs)):
            self.pool.fill(seq.blocks[i], min(bs, num_computed_tokens - i * bs))
        seq.num_computed_tokens = num_computed_tokens
        if not self.enable_prefix_caching:
            return
        first = len(seq.block_hashes)
        parent = seq.block_hashes[-1] if seq.block_hashes else salted_root(salt)
        new_hashes = iter_block_hashes(token_ids, bs, parent=parent, start_block=first,
                                       end_block=num_computed_tokens // bs)
        for i, block_hash in enumerate(new_hashes, start=first):
            seq.block_hashes.append(block_hash)
            self.pool.cache(seq.blocks[i], block_hash)

    def free(self, seq_id: Hashable) -> None:
        """Release seq_id's blocks; a no-op for a sequence holding none (idempotent).

        The table's tail is released first, so among the blocks that stay cached a prompt's
        leading blocks (the ones other prompts are likeliest to share) are evicted last.
        """
        seq = self._seqs.pop(seq_id, None)
        if seq is not None:
            self.pool.free(reversed(seq.blocks))

    # --- views --------------------------------------------------------------------------------

    def block_table(self, seq_id: Hashable) -> list[int]:
        """Block ids holding seq_id's tokens in order (token t is in block t // block_size); empty
        for a sequence holding no blocks."""
        seq = self._seqs.get(seq_id)
        return [b.block_id for b in seq.blocks] if seq is not None else []

    @property
    def num_blocks(self) -> int:
        """Usable blocks (the null block excluded)."""
        return self.pool.num_blocks

    @property
    def num_free_blocks(self) -> int:
        return self.pool.num_free_blocks

    def stats(self) -> KVCacheUsage:
        used = self.pool.num_used_blocks
        stored = self.pool.stored_tokens
        return KVCacheUsage(
            num_blocks=self.pool.num_blocks, free_blocks=self.pool.num_free_blocks, used_blocks=used,
            cached_blocks=self.pool.num_cached_blocks, stored_tokens=stored,
            empty_slots=used * self.block_size - stored,
            prefix_queries_tokens=self._prefix_queries_tokens, prefix_hits_tokens=self._prefix_hits_tokens,
        )
