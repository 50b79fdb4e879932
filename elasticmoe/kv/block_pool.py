"""Raw KV blocks: a free list in eviction order, reference counts, and the prefix-hash map.

A block whose reference count drops to zero goes to the tail of the free
queue but keeps its hash (lazy eviction): a later request with the same
prefix can take it back. Only when the block is handed out again is its hash
dropped. New blocks come from the head of the queue, so the least recently
freed block is evicted first.
"""

from __future__ import annotations

import hashlib
from array import array
from collections import OrderedDict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

# sha256 digest of a block's tokens chained from its parent's: collision-resistant, so
# no crafted prompt can share (and read) another request's cached blocks, which
# Python's hash() of a tuple allowed (vLLM moved the same way after CVE-2025-25183).
BlockHash = bytes
_ROOT = b"\x00" * 32


def hash_block_tokens(
    parent_hash: BlockHash | None, token_ids: Sequence[int], extra_keys: tuple = ()
) -> BlockHash:
    """Hash of a full block, chained from its parent so equal blocks at different
    prefixes never collide."""
    h = hashlib.sha256(parent_hash or _ROOT)
    h.update(array("q", token_ids).tobytes())
    if extra_keys:
        h.update(repr(extra_keys).encode())
    return h.digest()


def hash_request_tokens(
    block_size: int, token_ids: Sequence[int], parent_hash: BlockHash | None = None
) -> list[BlockHash]:
    """Chained hashes of every *full* block of ``token_ids``."""
    hashes: list[BlockHash] = []
    for start in range(0, len(token_ids) - block_size + 1, block_size):
        parent_hash = hash_block_tokens(parent_hash, token_ids[start : start + block_size])
        hashes.append(parent_hash)
    return hashes


@dataclass(eq=False)
class KVCacheBlock:
    """One block of KV slots."""

    block_id: int
    ref_cnt: int = 0
    block_hash: BlockHash | None = None

    def __repr__(self) -> str:
        return f"KVCacheBlock(id={self.block_id}, ref={self.ref_cnt}, hash={self.block_hash})"


class BlockPool:
    """Fixed set of blocks with a free queue (LRU order) and a hash -> block map."""

    def __init__(self, num_blocks: int, enable_caching: bool = True) -> None:
        if num_blocks <= 0:
            raise ValueError(f"num_blocks must be positive, got {num_blocks}")
        self.num_blocks = num_blocks
        self.enable_caching = enable_caching
        self.blocks = [KVCacheBlock(i) for i in range(num_blocks)]
        # block_id -> block, head = next to hand out / evict
        self.free_queue: OrderedDict[int, KVCacheBlock] = OrderedDict(
            (b.block_id, b) for b in self.blocks
        )
        self.cached: dict[BlockHash, KVCacheBlock] = {}

    @property
    def num_free_blocks(self) -> int:
        """Blocks that can be handed out now (including cached, unreferenced ones)."""
        return len(self.free_queue)

    @property
    def usage(self) -> float:
        """Fraction of blocks referenced by running sequences."""
        return 1.0 - self.num_free_blocks / self.num_blocks

    def get_cached_block(self, block_hash: BlockHash) -> KVCacheBlock | None:
        """The block holding this prefix hash, if it is still cached."""
        return self.cached.get(block_hash)

    def get_new_blocks(self, num_blocks: int) -> list[KVCacheBlock]:
        """Take ``num_blocks`` blocks from the head of the free queue (evicting their hashes)."""
        if num_blocks > self.num_free_blocks:
            raise ValueError(
                f"cannot allocate {num_blocks} blocks: only {self.num_free_blocks} free"
            )
        out = []
        for _ in range(num_blocks):
            _, block = self.free_queue.popitem(last=False)
            self._evict(block)
            block.ref_cnt = 1
            out.append(block)
        return out

    def _evict(self, block: KVCacheBlock) -> None:
        if block.block_hash is not None:
            if self.cached.get(block.block_hash) is block:
                del self.cached[block.block_hash]
            block.block_hash = None

    def touch(self, blocks: Iterable[KVCacheBlock]) -> None:
        """Take a reference on cache-hit blocks (removing them from the free queue)."""
        for block in blocks:
            if block.ref_cnt == 0:
                del self.free_queue[block.block_id]
            block.ref_cnt += 1

    def cache_full_block(self, block: KVCacheBlock, block_hash: BlockHash) -> None:
        """Record that ``block`` now holds the full block with ``block_hash``."""
        if not self.enable_caching or block.block_hash is not None:
            return
        block.block_hash = block_hash
        # keep the first copy: other requests may already share it
        self.cached.setdefault(block_hash, block)

    def free_blocks(self, ordered_blocks: Iterable[KVCacheBlock]) -> None:
        """Drop a reference on each block; unreferenced ones join the free queue tail
        in the given order (callers pass a request's blocks tail first)."""
        for block in ordered_blocks:
            assert block.ref_cnt > 0, f"double free of {block}"
            block.ref_cnt -= 1
            if block.ref_cnt == 0:
                if not self.enable_caching:
                    block.block_hash = None
                self.free_queue[block.block_id] = block

    def reset_prefix_cache(self) -> None:
        """Forget every cached hash (e.g. after weights change)."""
        for block in self.blocks:
            block.block_hash = None
        self.cached.clear()
