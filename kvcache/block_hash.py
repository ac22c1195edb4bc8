"""Chained block hashes: the keys of the prefix cache.

A full block's K/V depends on every token before it, not only on its own tokens, so its key is
the hash of (parent block's hash, this block's token ids). Equal keys then mean equal prefixes:
two sequences share block i only if their first (i + 1) * block_size tokens are identical.

The hash is SHA-256 over a fixed-width little-endian encoding of the token ids, so it is stable
across processes (Python's `hash()` is salted per process) and collisions are out of reach
(about 2^-128 for any pair), which lets the cache trust an equal key without comparing tokens.
Pure Python, no torch.
"""
from __future__ import annotations

import hashlib
import struct
from collections.abc import Iterator, Sequence

BlockHash = bytes  # a 32-byte SHA-256 digest

# The parent of a sequence's first block. A fixed tag rather than b"" keeps the first block's
# key from being the plain digest of its tokens.
ROOT_HASH: BlockHash = hashlib.sha256(b"kvserve/prefix-cache/root").digest()


def salted_root(salt: bytes | None) -> BlockHash | None:
    """The parent of a sequence's first block under `salt` (None: the shared ROOT_HASH).

    A salt (a tenant's cache_salt, a hash of its API key) is mixed into the first block's key and
    so, through the chain, into every key after it: two requests share blocks only when their
    salts are equal, so one tenant's prefixes never hit, or reveal themselves, for another.
    """
    if salt is None:
        return None
    return hashlib.sha256(ROOT_HASH + b"/salt/" + salt).digest()


def hash_block(parent: BlockHash | None, token_ids: Sequence[int]) -> BlockHash:
    """Key of one full block: chained from `parent` (None for the first block of a sequence)."""
    digest = hashlib.sha256(ROOT_HASH if parent is None else parent)
    try:
        # Fixed width, so [1, 23] and [12, 3] encode differently; the count guards block sizes.
        digest.update(struct.pack(f"<Q{len(token_ids)}q", len(token_ids), *token_ids))
    except struct.error:
        bad = next((t for t in token_ids if not isinstance(t, int) or not -2**63 <= t < 2**63), token_ids)
        raise ValueError(f"token id {bad!r} is out of range: must be an int in [-2**63, 2**63)") from None
    return digest.digest()


def iter_block_hashes(token_ids: Sequence[int], block_size: int, *, parent: BlockHash | None = None,
                      start_block: int = 0, end_block: int | None = None) -> Iterator[BlockHash]:
    """Chained keys of the full blocks start_block..end_block-1 of `token_ids`, lazily.

    `parent` is the key of block start_block - 1 (None when start_block is 0). A trailing
    partial block gets no key. Lazy so a prefix lookup stops hashing at its first miss; the
    range spares a caller copying a long token list to hash its last few blocks.
    """
    if block_size < 1:
        raise ValueError(f"block_size={block_size} is out of range: must be >= 1")
    num_full = len(token_ids) // block_size
    for i in range(start_block, num_full if end_block is None else min(end_block, num_full)):
        parent = hash_block(parent, token_ids[i * block_size:(i + 1) * block_size])
        yield parent
