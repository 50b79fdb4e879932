"""Block pool and KV cache manager: exact block ids and eviction order."""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest

from elasticmoe.kv.block_pool import BlockPool, hash_block_tokens, hash_request_tokens
from elasticmoe.kv.manager import KVCacheManager


@dataclass
class Req:
    request_id: str
    tokens: list[int]
    num_computed_tokens: int = 0
    extra: list[int] = field(default_factory=list)

    @property
    def num_tokens(self) -> int:
        return len(self.tokens) + len(self.extra)

    def token_ids(self, start: int, end: int) -> list[int]:
        return (self.tokens + self.extra)[start:end]


def ids(blocks) -> list[int]:
    return [b.block_id for b in blocks]


def test_new_blocks_come_from_the_head_in_order():
    pool = BlockPool(6)
    assert ids(pool.get_new_blocks(2)) == [0, 1]
    assert ids(pool.get_new_blocks(3)) == [2, 3, 4]
    assert pool.num_free_blocks == 1
    with pytest.raises(ValueError, match="only 1 free"):
        pool.get_new_blocks(2)


def test_freed_blocks_go_to_the_tail_in_the_given_order():
    pool = BlockPool(4)
    a = pool.get_new_blocks(3)  # 0 1 2; free: 3
    pool.free_blocks(reversed(a))  # free: 3 2 1 0
    assert ids(pool.get_new_blocks(4)) == [3, 2, 1, 0]


def test_ref_counts_and_double_free():
    pool = BlockPool(2)
    (b,) = pool.get_new_blocks(1)
    pool.touch([b])
    assert b.ref_cnt == 2
    pool.free_blocks([b])
    assert pool.num_free_blocks == 1  # still referenced once
    pool.free_blocks([b])
    assert pool.num_free_blocks == 2
    with pytest.raises(AssertionError, match="double free"):
        pool.free_blocks([b])


def test_hashes_chain_from_the_parent():
    h1 = hash_block_tokens(None, [1, 2])
    assert hash_block_tokens(h1, [3, 4]) != hash_block_tokens(None, [3, 4])
    assert hash_request_tokens(2, [1, 2, 3, 4, 5]) == [h1, hash_block_tokens(h1, [3, 4])]


def test_block_keys_are_sha256_digests():
    """Collision-resistant keys (not Python's hash()): the digest is sha256 over the
    parent's digest and the token ids, so it is the same in every process."""
    import hashlib
    from array import array

    h1 = hash_block_tokens(None, [1, 2])
    assert h1 == hashlib.sha256(b"\x00" * 32 + array("q", [1, 2]).tobytes()).digest()
    h2 = hashlib.sha256(h1 + array("q", [3, 4]).tobytes()).digest()
    assert hash_block_tokens(h1, [3, 4]) == h2
    assert hash_block_tokens(None, [1, 2], ("lora", 1)) != h1
    # ids that tuple-hash the same in CPython still get different keys
    assert hash((-1,)) == hash((-2,))
    assert hash_block_tokens(None, [-1]) != hash_block_tokens(None, [-2])


def test_prefix_hit_and_lazy_eviction_order():
    kv = KVCacheManager(num_blocks=6, block_size=2)
    a = Req("a", [1, 2, 3, 4, 5])
    assert ids(kv.allocate_slots(a, 5)) == [0, 1, 2]
    a.num_computed_tokens = 5
    kv.free("a")  # free queue: 3 4 5 2 1 0 (tail of a first)
    assert kv.pool.num_free_blocks == 6

    # same prefix: the two full blocks (ids 0, 1) come back from the cache
    b = Req("b", [1, 2, 3, 4, 9])
    hits, num = kv.get_computed_blocks(b)
    assert ids(hits) == [0, 1] and num == 4
    assert ids(kv.allocate_slots(b, 1, hits)) == [3]
    assert kv.block_ids("b") == [0, 1, 3]
    kv.free("b")  # queue: 4 5 2 3 1 0

    # a new request with no hit evicts from the head: 4 5 2 (2 held a's partial block)
    c = Req("c", [7] * 6)
    assert kv.get_computed_blocks(c) == ([], 0)
    assert ids(kv.allocate_slots(c, 6)) == [4, 5, 2]
    # blocks 0 and 1 are still cached
    assert kv.pool.get_cached_block(hash_block_tokens(None, [1, 2])).block_id == 0
    # now take everything: 3 1 0 get evicted, in that order, and lose their hashes
    d = Req("d", [8] * 6)
    assert ids(kv.allocate_slots(d, 6)) == [3, 1, 0]
    assert kv.pool.get_cached_block(hash_block_tokens(None, [1, 2])) is None


def test_whole_prompt_hit_still_computes_the_last_token():
    kv = KVCacheManager(num_blocks=8, block_size=2)
    a = Req("a", [1, 2, 3, 4])
    kv.allocate_slots(a, 4)
    kv.free("a")
    hits, num = kv.get_computed_blocks(Req("b", [1, 2, 3, 4]))
    assert num == 2 and ids(hits) == [0]


def test_out_of_blocks_returns_none_and_changes_nothing():
    kv = KVCacheManager(num_blocks=3, block_size=2)
    a = Req("a", [1, 2, 3, 4])
    kv.allocate_slots(a, 4)
    b = Req("b", [5, 6, 7, 8])
    assert kv.allocate_slots(b, 4) is None
    assert kv.pool.num_free_blocks == 1
    assert kv.usage == pytest.approx(2 / 3)


def test_shared_block_is_not_freed_while_referenced():
    kv = KVCacheManager(num_blocks=6, block_size=2)
    a = Req("a", [1, 2, 3])
    kv.allocate_slots(a, 3)
    a.num_computed_tokens = 3
    b = Req("b", [1, 2, 4])
    hits, _ = kv.get_computed_blocks(b)
    kv.allocate_slots(b, 1, hits)
    assert hits[0].ref_cnt == 2
    kv.free("a")
    assert hits[0].ref_cnt == 1 and hits[0].block_id not in kv.pool.free_queue


def test_decode_tokens_fill_and_cache_blocks():
    kv = KVCacheManager(num_blocks=4, block_size=2)
    a = Req("a", [1, 2, 3])
    kv.allocate_slots(a, 3)
    a.num_computed_tokens = 3
    a.extra.append(4)  # sampled token completes block 1
    assert kv.allocate_slots(a, 1) == []
    assert kv.pool.get_cached_block(hash_request_tokens(2, [1, 2, 3, 4])[1]).block_id == 1
    a.num_computed_tokens = 4
    a.extra.append(5)
    assert ids(kv.allocate_slots(a, 1)) == [2]


def test_prefix_caching_off():
    kv = KVCacheManager(num_blocks=4, block_size=2, enable_prefix_caching=False)
    a = Req("a", [1, 2, 3, 4, 5])
    kv.allocate_slots(a, 5)
    kv.free("a")
    assert kv.get_computed_blocks(Req("b", [1, 2, 3, 4, 5])) == ([], 0)
    assert not kv.pool.cached
