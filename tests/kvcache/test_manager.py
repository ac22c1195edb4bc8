"""KV cache manager: prefix hits, atomic allocation, accounting, and a hypothesis state machine
that checks every invariant against an independent recount from the block tables."""
from __future__ import annotations

from collections import Counter

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from kvcache.block_hash import iter_block_hashes
from kvcache.manager import KVCacheManager, KVCacheUsage


def admit(kv: KVCacheManager, seq_id, tokens: list[int]) -> int:
    """Admit a whole prompt, compute it, cache it; returns the prefix-hit tokens."""
    blocks, hit = kv.get_computed_blocks(tokens)
    assert kv.allocate_slots(seq_id, len(tokens), blocks)
    kv.record_prefix_lookup(len(tokens), hit)
    kv.cache_blocks(seq_id, tokens, len(tokens))
    return hit


def snapshot(kv: KVCacheManager, seq_ids) -> tuple:
    return (kv.stats(), {s: kv.block_table(s) for s in seq_ids},
            [(b.ref_count, b.block_hash, b.num_tokens) for b in kv.pool.blocks])


def test_prefix_hit_shares_blocks_without_copying():
    kv = KVCacheManager(num_blocks=10, block_size=16)
    a = list(range(40))
    admit(kv, "a", a)
    table_a = kv.block_table("a")
    b = a[:32] + [900, 901, 902]
    blocks, hit = kv.get_computed_blocks(b)
    assert (blocks, hit) == (table_a[:2], 32)
    assert kv.stats() == snapshot(kv, ["a"])[0]  # the lookup changed nothing
    assert kv.allocate_slots("b", len(b), blocks)
    table_b = kv.block_table("b")
    assert table_b[:2] == table_a[:2] and table_b[2] not in table_a
    assert [kv.pool.blocks[i].ref_count for i in table_a] == [2, 2, 1]
    kv.cache_blocks("b", b, len(b))
    s = kv.stats()
    # a: 40 tokens in 3 blocks, b: 3 more tokens in 1 new block; the shared 32 counted once.
    assert (s.used_blocks, s.stored_tokens, s.empty_slots) == (4, 43, 4 * 16 - 43)


def test_blocks_are_shared_only_under_the_same_salt():
    kv = KVCacheManager(num_blocks=20, block_size=16)
    tokens = list(range(50))
    blocks, hit = kv.get_computed_blocks(tokens, b"tenant-a")
    assert kv.allocate_slots("a", len(tokens), blocks)
    kv.cache_blocks("a", tokens, len(tokens), b"tenant-a")
    for salt in (None, b"tenant-b", b"tenant-a/"):  # another tenant, or none, learns nothing
        assert kv.get_computed_blocks(tokens, salt) == ([], 0)
    assert kv.get_computed_blocks(tokens, b"tenant-a") == (kv.block_table("a")[:3], 48)
    # the chain continues under the salt: a request admitted on a salted hit extends it
    longer = tokens + list(range(100, 130))
    blocks, hit = kv.get_computed_blocks(longer, b"tenant-a")
    assert kv.allocate_slots("a2", len(longer), blocks)
    kv.cache_blocks("a2", longer, len(longer), b"tenant-a")
    assert kv.get_computed_blocks(longer, b"tenant-a")[1] == 64 and kv.get_computed_blocks(longer)[1] == 0


@pytest.mark.parametrize(("length", "expect_blocks"), [(15, 0), (16, 0), (17, 1), (32, 1), (33, 2), (48, 2)])
def test_hit_leaves_at_least_one_token_to_compute(length, expect_blocks):
    kv = KVCacheManager(num_blocks=10, block_size=16)
    tokens = [7] * 48
    admit(kv, "a", tokens)
    blocks, hit = kv.get_computed_blocks(tokens[:length])
    assert blocks == kv.block_table("a")[:expect_blocks] and hit == 16 * expect_blocks
    assert hit < length


def test_freed_prefix_stays_cached_and_is_revived():
    kv = KVCacheManager(num_blocks=5, block_size=4)  # 4 usable blocks
    tokens = list(range(10))
    admit(kv, "a", tokens)
    kv.free("a")
    s = kv.stats()
    assert (s.used_blocks, s.free_blocks, s.cached_blocks, s.stored_tokens) == (0, 4, 2, 0)
    assert admit(kv, "b", tokens) == 8
    s = kv.stats()
    assert (s.used_blocks, s.cached_blocks, s.stored_tokens, s.empty_slots) == (3, 0, 10, 2)


def test_free_releases_the_tail_first_so_prefixes_are_evicted_last():
    kv = KVCacheManager(num_blocks=4, block_size=2)  # 3 usable blocks
    tokens = [5, 6, 7, 8, 9, 10]
    admit(kv, "a", tokens)
    first, second, third = kv.block_table("a")
    kv.free("a")
    assert kv.allocate_slots("x", 2)  # no unhashed block left: evicts the LRU cached one
    assert kv.block_table("x") == [third]
    assert kv.get_computed_blocks(tokens + [1]) == ([first, second], 4)
    assert kv.allocate_slots("y", 2)
    assert kv.block_table("y") == [second]
    assert kv.get_computed_blocks(tokens + [1]) == ([first], 2)


def test_allocation_fails_atomically():
    kv = KVCacheManager(num_blocks=6, block_size=4)  # 5 usable
    shared = list(range(8))
    admit(kv, "a", shared + [100])  # 3 blocks, 2 of them cached
    kv.free("a")
    admit(kv, "b", [50, 51, 52, 53, 54])  # 2 blocks
    # c hits a's two cached blocks (unreferenced, so they count against the free ones) and needs
    # 2 fresh blocks: 4 > 3 free.
    blocks, hit = kv.get_computed_blocks(shared + [1, 2, 3, 4, 5])
    assert hit == 8
    before = snapshot(kv, ["a", "b", "c"])
    assert not kv.can_allocate("c", 13, blocks)
    assert not kv.allocate_slots("c", 13, blocks)
    assert snapshot(kv, ["a", "b", "c"]) == before
    assert not kv.allocate_slots("b", 21)  # 4 more blocks: growing past the pool fails the same way
    assert snapshot(kv, ["a", "b", "c"]) == before
    assert kv.can_allocate("c", 12, blocks) and kv.allocate_slots("c", 12, blocks)
    assert kv.num_free_blocks == 0 and kv.stats().usage_ratio == 1.0


def test_growing_one_slot_at_a_time_allocates_a_block_per_block_size_tokens():
    kv = KVCacheManager(num_blocks=8, block_size=4)
    tokens = [1, 2, 3]
    assert kv.allocate_slots("s", 3)
    kv.cache_blocks("s", tokens, 3)
    sizes = []
    for t in range(10):
        tokens.append(t)
        assert kv.allocate_slots("s", len(tokens))
        kv.cache_blocks("s", tokens, len(tokens))
        sizes.append(len(kv.block_table("s")))
    assert sizes == [-(-n // 4) for n in range(4, 14)]
    assert kv.stats().stored_tokens == 13 and kv.stats().empty_slots == 16 - 13


def test_uncomputed_slots_are_empty_until_cache_blocks():
    kv = KVCacheManager(num_blocks=8, block_size=4)
    assert kv.allocate_slots("s", 10)
    assert (kv.stats().stored_tokens, kv.stats().empty_slots) == (0, 12)
    kv.cache_blocks("s", list(range(10)), 6)  # a chunk of the prefill
    assert (kv.stats().stored_tokens, kv.stats().empty_slots) == (6, 6)
    assert kv.get_computed_blocks(list(range(12))) == (kv.block_table("s")[:1], 4)
    with pytest.raises(ValueError, match=r"num_computed_tokens=5 is out of range: must be in \[6, 10\]"):
        kv.cache_blocks("s", list(range(10)), 5)


def test_chunked_prefill_registers_the_same_chained_hashes_as_one_step():
    tokens = [3, 1, 4, 1, 5, 9, 2, 6, 5, 3, 5, 8, 9, 7]
    kv = KVCacheManager(num_blocks=8, block_size=4)
    assert kv.allocate_slots("s", len(tokens))
    for done in (3, 5, 9, 14):
        kv.cache_blocks("s", tokens, done)
    keys = [kv.pool.blocks[b].block_hash for b in kv.block_table("s")]
    assert keys == list(iter_block_hashes(tokens, 4)) + [None]
    # Block 1's tokens alone do not make a hit: its key is chained on block 0.
    other = [0, 0, 0, 0] + tokens[4:]
    assert kv.get_computed_blocks(other) == ([], 0)


def test_identical_blocks_computed_twice_keep_the_first_mapping():
    kv = KVCacheManager(num_blocks=8, block_size=4)
    tokens = list(range(9))
    for s in ("a", "b"):  # both admitted before either was computed: no hit
        assert kv.get_computed_blocks(tokens) == ([], 0)
        assert kv.allocate_slots(s, len(tokens))
    kv.cache_blocks("a", tokens, 9)
    kv.cache_blocks("b", tokens, 9)
    assert kv.get_computed_blocks(tokens) == (kv.block_table("a")[:2], 8)
    assert not set(kv.block_table("a")) & set(kv.block_table("b"))
    kv.free("a")
    kv.free("b")
    assert kv.stats().cached_blocks == 2  # b's duplicates went back as plain free blocks


def test_prefix_caching_off():
    kv = KVCacheManager(num_blocks=8, block_size=4, enable_prefix_caching=False)
    tokens = list(range(9))
    assert admit(kv, "a", tokens) == 0
    assert kv.get_computed_blocks(tokens) == ([], 0)
    assert kv.stats().stored_tokens == 9
    with pytest.raises(ValueError, match="prefix caching is disabled"):
        kv.allocate_slots("b", 9, [1])
    kv.free("a")
    assert kv.stats().cached_blocks == 0 and kv.stats().free_blocks == 7


def test_stats_arithmetic():
    kv = KVCacheManager(num_blocks=11, block_size=4)
    admit(kv, "a", list(range(10)))          # 3 blocks, 10 tokens
    admit(kv, "b", list(range(8)) + [77])    # hits 2 blocks (8 tokens), 1 new block, 1 token
    assert kv.allocate_slots("c", 5)         # 2 blocks, nothing computed yet
    kv.free("a")                              # a's private last block frees; its 2 hashed stay with b
    assert kv.stats() == KVCacheUsage(
        num_blocks=10, free_blocks=10 - 5, used_blocks=5, cached_blocks=0, stored_tokens=8 + 1,
        empty_slots=5 * 4 - 9, prefix_queries_tokens=10 + 9, prefix_hits_tokens=8)
    kv.free("b")
    kv.free("c")
    assert kv.stats() == KVCacheUsage(
        num_blocks=10, free_blocks=10, used_blocks=0, cached_blocks=2, stored_tokens=0,
        empty_slots=0, prefix_queries_tokens=19, prefix_hits_tokens=8)
    assert kv.stats().usage_ratio == 0.0


def test_misuse_is_reported_clearly():
    kv = KVCacheManager(num_blocks=8, block_size=4)
    with pytest.raises(ValueError, match="block_size=0 is out of range"):
        KVCacheManager(num_blocks=8, block_size=0)
    with pytest.raises(ValueError, match="num_blocks=1 is out of range"):
        KVCacheManager(num_blocks=1)
    with pytest.raises(ValueError, match="num_total_tokens=-1 is out of range"):
        kv.allocate_slots("s", -1)
    with pytest.raises(ValueError, match="not in the prefix cache"):
        kv.allocate_slots("s", 8, [3])
    with pytest.raises(ValueError, match=r"block id 99 is out of range: must be in \[1, 7\]"):
        kv.allocate_slots("s", 8, [99])
    with pytest.raises(ValueError, match="hit_tokens=5 is out of range"):
        kv.record_prefix_lookup(4, 5)
    with pytest.raises(ValueError, match="holds no blocks"):
        kv.cache_blocks("nobody", [1], 1)
    admit(kv, "a", list(range(9)))
    with pytest.raises(ValueError, match="first allocation"):
        kv.allocate_slots("a", 12, kv.block_table("a")[:1])
    kv.free("nobody")  # idempotent: no blocks, nothing to do
    assert kv.block_table("nobody") == []


# --- property tests ------------------------------------------------------------------------------

VOCAB = 4  # a tiny vocabulary makes accidental sharing common too
PREFIXES = [[0, 1, 2, 3, 0, 1, 2, 3, 0, 1, 2, 3] * 2, [3, 3, 2, 2, 1, 1, 0, 0] * 3, [1] * 24]


class ManagerMachine(RuleBasedStateMachine):
    """Random admit / grow / compute / free against a model of what each block holds.

    `written[block_id]` is the whole token prefix the K/V in that block belongs to (the tokens up
    to the block's end, as computed by the sequence that wrote it): a prefix hit is sound when
    every returned block's written prefix equals the prompt's, and complete when it stops only
    where no hashed block holds the next prefix.
    """

    @initialize(num_blocks=st.integers(2, 24), block_size=st.sampled_from([1, 2, 4]),
                caching=st.sampled_from([True, True, True, False]))
    def setup(self, num_blocks, block_size, caching):
        self.kv = KVCacheManager(num_blocks, block_size, enable_prefix_caching=caching)
        self.bs = block_size
        self.seqs: dict[int, dict] = {}  # id -> tokens, allocated (tokens covered), computed
        self.written: dict[int, tuple[int, ...]] = {}
        self.next_id = 0
        self.queried = self.hits = 0

    def recount(self) -> Counter:
        return Counter(b for s in self.seqs for b in self.kv.block_table(s))

    def free_count(self) -> int:
        return self.kv.num_blocks - len(self.recount())

    def expected_hit_blocks(self, tokens: list[int]) -> int:
        if not self.kv.enable_prefix_caching:
            return 0
        hashed = {self.written.get(b.block_id) for b in self.kv.pool.blocks if b.block_hash is not None}
        n = 0
        while n < (len(tokens) - 1) // self.bs and tuple(tokens[:(n + 1) * self.bs]) in hashed:
            n += 1
        return n

    @rule(prefix=st.integers(0, len(PREFIXES) - 1), keep=st.integers(0, 24),
          tail=st.lists(st.integers(0, VOCAB - 1), max_size=6), chunk=st.integers(1, 30),
          run_step=st.booleans())
    def admit(self, prefix, keep, tail, chunk, run_step):
        """Admit a prompt's first chunk; with run_step, also compute it (as the next step would)."""
        tokens = PREFIXES[prefix][:keep] + tail
        if not tokens:
            return
        blocks, hit = self.kv.get_computed_blocks(tokens)
        assert hit == len(blocks) * self.bs < len(tokens)
        assert len(blocks) == self.expected_hit_blocks(tokens)
        for i, b in enumerate(blocks):
            assert self.written[b] == tuple(tokens[:(i + 1) * self.bs])
        total = min(len(tokens), hit + chunk)
        refs = self.recount()
        need = -(-total // self.bs) - len(blocks) + sum(1 for b in blocks if refs[b] == 0)
        fits = need <= self.free_count()
        before = snapshot(self.kv, list(self.seqs) + [self.next_id])
        assert self.kv.can_allocate(self.next_id, total, blocks) == fits
        assert self.kv.allocate_slots(self.next_id, total, blocks) == fits
        if not fits:
            assert snapshot(self.kv, list(self.seqs) + [self.next_id]) == before
            return
        assert self.kv.block_table(self.next_id)[:len(blocks)] == blocks
        self.kv.record_prefix_lookup(len(tokens), hit)
        self.queried += len(tokens)
        self.hits += hit
        self.seqs[self.next_id] = {"tokens": tokens, "allocated": total, "computed": hit}
        self.next_id += 1
        if run_step:
            self.run_step(self.next_id - 1, total - hit)

    @precondition(lambda self: self.seqs)
    @rule(pick=st.integers(0, 999), new_tokens=st.lists(st.integers(0, VOCAB - 1), max_size=3),
          chunk=st.integers(1, 9))
    def grow(self, pick, new_tokens, chunk):
        seq_id = sorted(self.seqs)[pick % len(self.seqs)]
        seq = self.seqs[seq_id]
        tokens = seq["tokens"] + new_tokens
        total = max(seq["allocated"], min(len(tokens), seq["computed"] + chunk))
        need = -(-total // self.bs) - len(self.kv.block_table(seq_id))
        fits = need <= self.free_count()
        before = snapshot(self.kv, list(self.seqs))
        assert self.kv.allocate_slots(seq_id, total) == fits
        if fits:
            seq["tokens"], seq["allocated"] = tokens, total
        else:
            assert snapshot(self.kv, list(self.seqs)) == before

    @precondition(lambda self: self.seqs)
    @rule(pick=st.integers(0, 999), n=st.integers(0, 24))
    def compute(self, pick, n):
        self.run_step(sorted(self.seqs)[pick % len(self.seqs)], n)

    def run_step(self, seq_id: int, n: int) -> None:
        """Compute up to n more of the sequence's allocated tokens and report them."""
        seq = self.seqs[seq_id]
        old, new = seq["computed"], min(seq["allocated"], seq["computed"] + n)
        table, refs = self.kv.block_table(seq_id), self.recount()
        for i in range(old // self.bs, -(-new // self.bs)):
            assert refs[table[i]] == 1, "a step must never write into a shared block"
            self.written[table[i]] = tuple(seq["tokens"][:min(new, (i + 1) * self.bs)])
        self.kv.cache_blocks(seq_id, seq["tokens"], new)
        seq["computed"] = new

    @precondition(lambda self: self.seqs)
    @rule(pick=st.integers(0, 999))
    def free(self, pick):
        seq_id = sorted(self.seqs)[pick % len(self.seqs)]
        self.kv.free(seq_id)
        del self.seqs[seq_id]

    @rule()
    def free_all(self):
        for seq_id in list(self.seqs):
            self.kv.free(seq_id)
        self.seqs.clear()
        s = self.kv.stats()
        assert (s.used_blocks, s.free_blocks, s.stored_tokens, s.empty_slots) == (0, s.num_blocks, 0, 0)

    @invariant()
    def invariants_hold(self):
        if not hasattr(self, "kv"):
            return
        kv, bs, s = self.kv, self.bs, self.kv.stats()
        refs = self.recount()
        stored = {}
        for seq_id, seq in self.seqs.items():
            table = kv.block_table(seq_id)
            assert len(table) == -(-seq["allocated"] // bs), "allocated exactly what was asked"
            assert 0 not in table and len(set(table)) == len(table)
            for i, b in enumerate(table):
                stored[b] = max(stored.get(b, 0), min(bs, max(0, seq["computed"] - i * bs)))
        for block in kv.pool.blocks[1:]:
            assert block.ref_count == refs[block.block_id]
            if refs[block.block_id] > 1:
                assert block.block_hash is not None, "shared only through the prefix cache"
            if block.block_hash is not None:
                assert kv.pool.lookup(block.block_hash) is block
        cached = sum(1 for b in kv.pool.blocks[1:] if b.ref_count == 0 and b.block_hash is not None)
        assert s.used_blocks == len(refs) and s.free_blocks == s.num_blocks - len(refs)
        assert s.free_blocks + s.used_blocks == s.num_blocks == len(kv.pool.blocks) - 1
        assert s.cached_blocks == cached and (cached == 0 or kv.enable_prefix_caching)
        assert s.stored_tokens == sum(stored.values())
        assert s.empty_slots == s.used_blocks * bs - s.stored_tokens
        assert (s.prefix_queries_tokens, s.prefix_hits_tokens) == (self.queried, self.hits)
        assert s.usage_ratio == s.used_blocks / s.num_blocks


ManagerMachine.TestCase.settings = settings(max_examples=200, stateful_step_count=25, deadline=None)
TestManagerProperties = ManagerMachine.TestCase
