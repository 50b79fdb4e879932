"""Per-request KV block management on top of the block pool.

The scheduler asks two questions: how much of a request's prefix is already
cached (:meth:`KVCacheManager.get_computed_blocks`), and can it have room for
N more tokens (:meth:`KVCacheManager.allocate_slots`, which returns ``None``
when the pool is out of blocks; running out is an outcome, not an error).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol

from elasticmoe.kv.block_pool import BlockHash, BlockPool, KVCacheBlock, hash_block_tokens


class KVRequest(Protocol):
    """What the manager needs to know about a request."""

    request_id: str
    num_computed_tokens: int

    @property
    def num_tokens(self) -> int: ...

    def token_ids(self, start: int, end: int) -> Sequence[int]: ...


@dataclass
class PrefixCacheStats:
    """Token counts for the prefix cache hit rate."""

    queries: int = 0
    hits: int = 0

    @property
    def hit_rate(self) -> float:
        """Share of looked-up prompt tokens found in the cache."""
        return self.hits / self.queries if self.queries else 0.0


@dataclass
class _RequestBlocks:
    blocks: list[KVCacheBlock] = field(default_factory=list)
    block_ids: list[int] = field(default_factory=list)  # of ``blocks``, kept alongside
    hashes: list[BlockHash] = field(default_factory=list)
    num_cached: int = 0  # leading blocks already registered in the prefix cache


class KVCacheManager:
    """Allocates, caches and frees the blocks of each request."""

    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True):
        if block_size <= 0:
            raise ValueError(f"block_size must be positive, got {block_size}")
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.pool = BlockPool(num_blocks, enable_prefix_caching)
        self.requests: dict[str, _RequestBlocks] = {}
        self.stats = PrefixCacheStats()

    @property
    def usage(self) -> float:
        """Fraction of KV blocks held by requests."""
        return self.pool.usage

    def _hashes(self, request: KVRequest, state: _RequestBlocks) -> list[BlockHash]:
        """Chained hashes of the request's full blocks, extended incrementally: only the
        tokens of blocks filled since the last call are read."""
        bs = self.block_size
        num_tokens = request.num_tokens
        while (len(state.hashes) + 1) * bs <= num_tokens:
            start = len(state.hashes) * bs
            parent = state.hashes[-1] if state.hashes else None
            state.hashes.append(hash_block_tokens(parent, request.token_ids(start, start + bs)))
        return state.hashes

    def get_computed_blocks(self, request: KVRequest) -> tuple[list[KVCacheBlock], int]:
        """Longest cached prefix of a waiting request: (blocks, number of tokens).

        At least the last token is always left to compute, since its logits
        are needed.
        """
        if not self.enable_prefix_caching:
            return [], 0
        state = self.requests.setdefault(request.request_id, _RequestBlocks())
        num_tokens = request.num_tokens
        max_blocks = (num_tokens - 1) // self.block_size
        hits: list[KVCacheBlock] = []
        for block_hash in self._hashes(request, state)[:max_blocks]:
            block = self.pool.get_cached_block(block_hash)
            if block is None:
                break
            hits.append(block)
        self.stats.queries += num_tokens
        self.stats.hits += len(hits) * self.block_size
        return hits, len(hits) * self.block_size

    def allocate_slots(
        self,
        request: KVRequest,
        num_new_tokens: int,
        new_computed_blocks: Sequence[KVCacheBlock] = (),
    ) -> list[KVCacheBlock] | None:
        """Reserve room for ``num_new_tokens`` after the request's computed tokens.

        ``new_computed_blocks`` are prefix-cache hits (from
        :meth:`get_computed_blocks`) to take on. Returns the newly allocated
        blocks, or ``None`` (and changes nothing) if the pool lacks room.
        """
        if num_new_tokens <= 0:
            raise ValueError(f"num_new_tokens must be positive, got {num_new_tokens}")
        state = self.requests.setdefault(request.request_id, _RequestBlocks())
        bs = self.block_size
        num_computed = request.num_computed_tokens + len(new_computed_blocks) * bs
        total_tokens = num_computed + num_new_tokens
        num_needed = -(-total_tokens // bs) - len(state.blocks) - len(new_computed_blocks)
        # hits sitting in the free queue stop being allocatable once taken
        num_evictable_hits = sum(1 for b in new_computed_blocks if b.ref_cnt == 0)
        if num_needed + num_evictable_hits > self.pool.num_free_blocks:
            return None
        self.pool.touch(new_computed_blocks)
        new_blocks = self.pool.get_new_blocks(max(num_needed, 0))
        for blocks in (new_computed_blocks, new_blocks):
            if blocks:
                state.blocks.extend(blocks)
                state.block_ids.extend([b.block_id for b in blocks])
        if self.enable_prefix_caching:
            # this step writes the KV of these tokens, so their full blocks are cacheable now
            num_full = min(total_tokens, request.num_tokens) // bs
            hashes = self._hashes(request, state)
            for i in range(state.num_cached, num_full):
                self.pool.cache_full_block(state.blocks[i], hashes[i])
            state.num_cached = max(state.num_cached, num_full)
        return new_blocks

    def block_ids(self, request_id: str) -> list[int]:
        """The request's block table (the manager's own list, kept as blocks are added:
        read it, do not change it)."""
        return self.requests[request_id].block_ids

    def free(self, request_id: str) -> None:
        """Release a finished or preempted request's blocks, tail first."""
        state = self.requests.pop(request_id, None)
        if state is not None:
            self.pool.free_blocks(reversed(state.blocks))
