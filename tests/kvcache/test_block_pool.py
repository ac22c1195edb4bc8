"""Block pool and block hashes: free-queue order, LRU eviction, ref counts, hash chaining."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from kvcache.block_hash import ROOT_HASH, hash_block, iter_block_hashes
from kvcache.block_pool import NULL_BLOCK_ID, BlockPool

REPO = Path(__file__).resolve().parents[2]


def h(i: int) -> bytes:
    """A distinct stand-in hash per int."""
    return hash_block(None, [i])


def test_null_block_is_never_handed_out():
    pool = BlockPool(6)
    blocks = pool.allocate(5)
    assert sorted(b.block_id for b in blocks) == [1, 2, 3, 4, 5]
    assert pool.num_free_blocks == 0 and pool.num_used_blocks == 5
    with pytest.raises(ValueError, match="only 0 are free"):
        pool.allocate(1)
    pool.free(blocks)
    assert sorted(b.block_id for b in pool.allocate(5)) == [1, 2, 3, 4, 5]
    with pytest.raises(ValueError, match="double free"):
        pool.free([pool.blocks[NULL_BLOCK_ID]])


def test_num_blocks_range_error():
    with pytest.raises(ValueError, match=r"num_blocks=1 is out of range: must be >= 2"):
        BlockPool(1)


def test_unhashed_blocks_are_reused_before_cached_ones():
    pool = BlockPool(5)  # 4 usable
    a, b, c, d = pool.allocate(4)
    pool.fill(a, 4)
    assert pool.cache(a, h(0))
    pool.free([a, b, c, d])
    assert pool.num_cached_blocks == 1 and pool.num_free_blocks == 4
    taken = pool.allocate(3)
    assert a not in taken  # the three unhashed blocks went first
    assert pool.lookup(h(0)) is a and a.num_tokens == 4
    (last,) = pool.allocate(1)  # only now is the cached block evicted
    assert last is a and a.block_hash is None and a.num_tokens == 0
    assert pool.lookup(h(0)) is None


def test_cached_blocks_are_evicted_least_recently_freed_first():
    pool = BlockPool(5)
    blocks = pool.allocate(4)
    for i, blk in enumerate(blocks):
        pool.cache(blk, h(i))
    order = [blocks[2], blocks[0], blocks[3], blocks[1]]
    pool.free(order)
    pool.touch([blocks[0]])   # a prefix hit takes it out of the evictable set...
    pool.free([blocks[0]])    # ...and freeing it again makes it the most recently used
    evicted = [pool.allocate(1)[0] for _ in range(4)]
    assert evicted == [blocks[2], blocks[3], blocks[1], blocks[0]]
    assert all(pool.lookup(h(i)) is None for i in range(4))


def test_touch_and_free_count_references():
    pool = BlockPool(4)
    (blk,) = pool.allocate(1)
    pool.fill(blk, 3)
    pool.cache(blk, h(7))
    pool.touch([blk])
    assert blk.ref_count == 2 and pool.num_used_blocks == 1 and pool.stored_tokens == 3
    pool.free([blk])
    assert blk.ref_count == 1 and pool.num_used_blocks == 1 and pool.num_cached_blocks == 0
    pool.free([blk])
    assert pool.num_used_blocks == 0 and pool.num_cached_blocks == 1 and pool.stored_tokens == 0
    pool.touch([blk])  # revived from the cache: its tokens count as stored again
    assert pool.num_used_blocks == 1 and pool.stored_tokens == 3 and pool.num_free_blocks == 2
    pool.free([blk])
    with pytest.raises(ValueError, match="double free"):
        pool.free([blk])


def test_touch_rejects_a_free_unhashed_block():
    pool = BlockPool(3)
    with pytest.raises(ValueError, match="not cached"):
        pool.touch([pool.blocks[1]])


def test_duplicate_hash_keeps_the_first_block():
    pool = BlockPool(4)
    a, b = pool.allocate(2)
    assert pool.cache(a, h(1))
    assert not pool.cache(b, h(1))
    assert pool.lookup(h(1)) is a and b.block_hash is None
    pool.free([a, b])
    assert pool.num_cached_blocks == 1  # b went back as a plain free block
    pool.touch([a])
    with pytest.raises(ValueError, match="already cached"):
        pool.cache(a, h(2))


def test_fill_tracks_stored_tokens_of_used_blocks_only():
    pool = BlockPool(4)
    a, b = pool.allocate(2)
    pool.fill(a, 4)
    pool.fill(b, 1)
    pool.fill(b, 3)
    assert pool.stored_tokens == 7
    pool.free([b])
    assert pool.stored_tokens == 4 and b.num_tokens == 0
    with pytest.raises(ValueError, match="not in use"):
        pool.fill(b, 1)


# --- block hashes --------------------------------------------------------------------------------

def test_hash_is_chained_on_the_parent():
    first = hash_block(None, [1, 2])
    assert hash_block(first, [3, 4]) != hash_block(hash_block(None, [9, 9]), [3, 4])
    assert hash_block(None, [1, 2]) == first  # deterministic
    assert hash_block(ROOT_HASH, [1, 2]) == first  # None means "the root"
    assert len(first) == 32


def test_hash_encoding_is_unambiguous():
    keys = {hash_block(None, t) for t in ([1, 23], [12, 3], [123], [1, 2, 3], [], [0], [0, 0])}
    assert len(keys) == 7


def test_hash_rejects_token_ids_it_cannot_encode():
    with pytest.raises(ValueError, match=f"token id {2**70} is out of range"):
        hash_block(None, [1, 2**70])
    with pytest.raises(ValueError, match="token id 'a' is out of range"):
        hash_block(None, [1, "a"])


def test_iter_block_hashes_matches_manual_chain():
    tokens = list(range(11))
    keys = list(iter_block_hashes(tokens, 4))
    k0 = hash_block(None, [0, 1, 2, 3])
    k1 = hash_block(k0, [4, 5, 6, 7])
    assert keys == [k0, k1]  # the partial block [8, 9, 10] has no key
    assert list(iter_block_hashes(tokens, 4, parent=k0, start_block=1)) == [k1]
    assert list(iter_block_hashes(tokens, 4, end_block=1)) == [k0]
    with pytest.raises(ValueError, match="block_size=0"):
        list(iter_block_hashes(tokens, 0))


def test_hash_is_stable_across_processes():
    """Python's hash() is salted per process; the prefix cache's keys must not be."""
    code = "from kvcache.block_hash import iter_block_hashes as f; print([k.hex() for k in f(list(range(40)), 16)])"
    outs = set()
    for seed in ("1", "2"):
        env = {**os.environ, "PYTHONHASHSEED": seed, "PYTHONPATH": str(REPO)}
        outs.add(subprocess.run([sys.executable, "-c", code], env=env, cwd=REPO, capture_output=True,
                                text=True, check=True).stdout)
    here = str([k.hex() for k in iter_block_hashes(list(range(40)), 16)]) + "\n"
    assert outs == {here}
