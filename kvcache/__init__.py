"""Paged KV cache. The block bookkeeping re-exported here is pure Python (no torch); the KV
tensors (`kvcache.kv_cache`) and attention metadata (`kvcache.metadata`) import torch and are
imported from their modules."""
from kvcache.block_hash import BlockHash, hash_block, iter_block_hashes
from kvcache.block_pool import NULL_BLOCK_ID, Block, BlockPool
from kvcache.manager import KVCacheManager, KVCacheUsage

__all__ = [
    "NULL_BLOCK_ID", "Block", "BlockHash", "BlockPool", "KVCacheManager", "KVCacheUsage",
    "hash_block", "iter_block_hashes",
]
