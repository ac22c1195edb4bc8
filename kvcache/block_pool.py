"""The block pool: every KV block's ref_count and hash, the free queue, and the prefix-cache map.

Pure Python bookkeeping over block ids (no torch); the KV tensors live in `kv_cache.KVCache`.
Block 0 is the null block: block tables are padded with it, so it is never handed out.

A usable block is in exactly one of three states:
- used:      ref_count > 0, in at least one sequence's block table;
- free:      ref_count == 0 and no hash, in `_free_unhashed` (handed out first);
- cached:    ref_count == 0 with a hash, in `_evictable`: still reusable by a prefix-cache hit
             until it is evicted, least recently freed first, when the unhashed blocks run out.
"Free blocks" in the accounting are free + cached: both can be allocated.

Invariants (checked by tests/kvcache property tests):
- num_free_blocks + num_used_blocks == num_blocks (the null block excluded);
- a block has a hash iff the hash map points to it (`_cached[b.block_hash] is b`);
- every cached (evictable) block has a hash; every free unhashed block holds no tokens;
- stored_tokens == sum of num_tokens over used blocks.
All operations are O(1) per block: a deque and an OrderedDict (insertion order = LRU order).
"""
from __future__ import annotations

from collections import OrderedDict, deque
from collections.abc import Iterable
from dataclasses import dataclass

from kvcache.block_hash import BlockHash

NULL_BLOCK_ID = 0


@dataclass(slots=True)
class Block:
    block_id: int
    ref_count: int = 0
    block_hash: BlockHash | None = None  # set while registered in the prefix cache
    num_tokens: int = 0                  # slots holding computed K/V, 0..block_size

    @property
    def cached_hash(self) -> BlockHash:
        """The key of a block registered in the prefix cache (ValueError for any other block)."""
        if self.block_hash is None:
            raise ValueError(f"block {self.block_id} is not in the prefix cache")
        return self.block_hash


class BlockPool:
    def __init__(self, num_blocks: int):
        if num_blocks < 2:
            raise ValueError(f"num_blocks={num_blocks} is out of range: must be >= 2 (block 0 is the null block)")
        self.blocks = [Block(i) for i in range(num_blocks)]
        self._free_unhashed: deque[Block] = deque(self.blocks[1:])
        self._evictable: OrderedDict[int, Block] = OrderedDict()  # oldest first
        self._cached: dict[BlockHash, Block] = {}
        self._num_used = 0
        self._stored_tokens = 0

    @property
    def num_blocks(self) -> int:
        """Usable blocks (the null block excluded)."""
        return len(self.blocks) - 1

    @property
    def num_free_blocks(self) -> int:
        """Blocks an allocation can take: never-used, freed and cached-but-unreferenced."""
        return len(self._free_unhashed) + len(self._evictable)

    @property
    def num_used_blocks(self) -> int:
        return self._num_used

    @property
    def num_cached_blocks(self) -> int:
        """Free blocks that still hold a hashed full block (reusable until evicted)."""
        return len(self._evictable)

    @property
    def stored_tokens(self) -> int:
        """Tokens held by used blocks, each block counted once however many tables share it."""
        return self._stored_tokens

    def lookup(self, block_hash: BlockHash) -> Block | None:
        """The block registered under a hash, used or cached; None on a miss. No side effects."""
        return self._cached.get(block_hash)

    def allocate(self, n: int) -> list[Block]:
        """Take n blocks (ref_count 1): unhashed first, then evict cached ones, LRU first."""
        if n > self.num_free_blocks:
            raise ValueError(f"cannot allocate {n} blocks: only {self.num_free_blocks} are free")
        out = []
        for _ in range(n):
            if self._free_unhashed:
                block = self._free_unhashed.popleft()
            else:
                _, block = self._evictable.popitem(last=False)
                del self._cached[block.cached_hash]
                block.block_hash = None
                block.num_tokens = 0
            block.ref_count = 1
            out.append(block)
        self._num_used += n
        return out

    def touch(self, blocks: Iterable[Block]) -> None:
        """Add a reference to cached blocks (a prefix hit); unreferenced ones leave the evictable set."""
        for block in blocks:
            if block.ref_count == 0:
                if block.block_id not in self._evictable:
                    raise ValueError(f"block {block.block_id} is free and not cached: it cannot be shared")
                del self._evictable[block.block_id]
                self._num_used += 1
                self._stored_tokens += block.num_tokens
            block.ref_count += 1

    def free(self, blocks: Iterable[Block]) -> None:
        """Drop one reference from each block, in the given order (the first freed is evicted first)."""
        for block in blocks:
            if block.ref_count <= 0 or block.block_id == NULL_BLOCK_ID:
                raise ValueError(f"block {block.block_id} is not in use: double free")
            block.ref_count -= 1
            if block.ref_count:
                continue
            self._num_used -= 1
            self._stored_tokens -= block.num_tokens
            if block.block_hash is not None:
                self._evictable[block.block_id] = block  # most recently used end
            else:
                block.num_tokens = 0
                self._free_unhashed.appendleft(block)

    def fill(self, block: Block, num_tokens: int) -> None:
        """Record that a used block now holds num_tokens computed tokens."""
        if block.ref_count <= 0:
            raise ValueError(f"block {block.block_id} is not in use: cannot store tokens in it")
        self._stored_tokens += num_tokens - block.num_tokens
        block.num_tokens = num_tokens

    def cache(self, block: Block, block_hash: BlockHash) -> bool:
        """Register a used full block under its hash. An identical block already registered keeps
        the entry (False) and this block stays unhashed: it is freed like any private block."""
        if block.block_hash is not None:
            raise ValueError(f"block {block.block_id} is already cached")
        if block_hash in self._cached:
            return False
        block.block_hash = block_hash
        self._cached[block_hash] = block
        return True
