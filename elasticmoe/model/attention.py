"""Paged attention in plain torch.

K/V live in per-layer block tensors ``[num_blocks, block_size, kv_heads,
head_dim]``. Each step writes the new tokens' K/V at their slots and reads a
sequence's context by gathering its blocks through its block table; there is
no per-sequence contiguous cache to grow or concatenate.

What one token stores per layer is the family's cache layout (:data:`CacheLayout`):
K and V for GQA, one compressed latent for multi-head latent attention (deepseek_v3:
``kv_lora_rank + qk_rope_head_dim`` values, read by every head; see
:func:`paged_latent_attention`).

A batch is a flat list of T tokens from B sequences (varlen). Sequences that
add exactly one token (decode) are attended in one batched call; sequences
adding several (prefill chunks) are padded to the longest chunk in a second
call, so decode rows never pay for a prefill's query length.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from elasticmoe.model import kernels


@dataclass
class AttentionGroup:
    """Sequences attended together, with queries padded to ``max_q``.

    token_idx: [B, max_q] row of each query in the flat batch (padding -> 0).
    positions: [B, max_q] absolute position of each query (padding -> 0, so a
      padded row still sees key 0 and softmax stays finite).
    block_tables: [B, max_blocks] block ids of each sequence (padding -> 0).
    q_valid: [B, max_q] which query slots are real (None when max_q == 1).

    The additive attention mask is the same for every layer of a step: the first layer
    builds it (:func:`group_mask`) and the others reuse it.
    """

    token_idx: torch.Tensor
    positions: torch.Tensor
    block_tables: torch.Tensor
    q_valid: torch.Tensor | None
    # With q_valid: the flat [B * max_q] rows that are real, and their token rows (built on
    # the host with the rest of the step, so writing the output back never syncs).
    valid_rows: torch.Tensor | None = None
    valid_token_idx: torch.Tensor | None = None
    _masks: dict[tuple, torch.Tensor] = field(default_factory=dict, repr=False)


@dataclass
class AttentionMetadata:
    """Where this step's tokens go in the cache and which context each reads."""

    slot_mapping: torch.Tensor  # [T] block_id * block_size + offset
    groups: list[AttentionGroup]
    # Trailing rows of the flat batch that only pad it to a bucket size (their K/V go to the
    # cache's scratch block; the MoE layers leave them out of the load counts).
    num_padding_tokens: int = 0


# What one token stores in one layer's cache: (name, heads, dim) per tensor, e.g.
# (("k", Hkv, D), ("v", Hkv, D)) for GQA or (("latent", 1, kv_lora_rank + rope_dim),) for MLA.
CacheLayout = Sequence[tuple[str, int, int]]


def kv_layout(num_kv_heads: int, head_dim: int) -> tuple[tuple[str, int, int], ...]:
    """The GQA layout: a K and a V tensor of ``num_kv_heads`` x ``head_dim`` per token."""
    return (("k", num_kv_heads, head_dim), ("v", num_kv_heads, head_dim))


class PagedKVCache:
    """The physical cache block tensors of all layers, one per entry of the layout.

    ``tensors[name][layer]`` is ``[num_blocks + 1, block_size, heads, dim]``; ``layers[i]``
    is layer i's tensors in layout order (what its attention module takes); ``k``/``v`` are
    the GQA layout's lists (empty for other layouts).

    One block past ``num_blocks`` (``scratch_block``) belongs to no request: rows that only
    pad a batch to a bucket size write their K/V there.
    """

    def __init__(
        self,
        num_layers: int,
        num_blocks: int,
        block_size: int,
        layout: CacheLayout,
        dtype: torch.dtype,
        device: torch.device | str,
    ) -> None:
        self.block_size = block_size
        self.num_blocks = num_blocks
        self.scratch_block = num_blocks
        self.layout = tuple(layout)
        self.dtype = dtype
        self.num_layers = num_layers
        self.tensors = {
            name: [
                torch.zeros((num_blocks + 1, block_size, heads, dim), dtype=dtype, device=device)
                for _ in range(num_layers)
            ]
            for name, heads, dim in self.layout
        }
        self.layers = [
            tuple(self.tensors[name][i] for name, _, _ in self.layout) for i in range(num_layers)
        ]
        self.k = self.tensors.get("k", [])
        self.v = self.tensors.get("v", [])

    @staticmethod
    def bytes_per_block(
        num_layers: int, block_size: int, layout: CacheLayout, dtype: torch.dtype
    ) -> int:
        """Memory one block takes across all layers (every tensor of the layout)."""
        itemsize = torch.empty((), dtype=dtype).element_size()
        per_token = sum(heads * dim for _, heads, dim in layout)
        return num_layers * block_size * per_token * itemsize

    @property
    def bytes_per_token(self) -> int:
        """Cache memory one token takes across all layers."""
        return self.bytes_per_block(self.num_layers, 1, self.layout, self.dtype)


def group_mask(
    group: AttentionGroup,
    num_keys: int,
    num_q_per_kv: int,
    sliding_window: int | None,
    dtype: torch.dtype,
) -> torch.Tensor:
    """The group's additive mask [B, 1, G * max_q, S] (0 or -inf), built once per step.

    Rows are ``(g, q)``: the G query heads that share a KV head are stacked along the query
    axis (see :func:`paged_attention`), and each sees the same keys as its query position.
    """
    key = (num_keys, num_q_per_kv, sliding_window, dtype)
    mask = group._masks.get(key)
    if mask is None:
        key_pos = torch.arange(num_keys, device=group.positions.device)
        # causal over absolute positions; keys past a sequence's length sit at
        # positions > any of its queries, so this also masks the block padding
        allowed = key_pos[None, None, :] <= group.positions[:, :, None]  # [B, max_q, S]
        if sliding_window is not None:
            allowed &= key_pos[None, None, :] > group.positions[:, :, None] - sliding_window
        mask = torch.zeros(allowed.shape, dtype=dtype, device=allowed.device)
        mask.masked_fill_(~allowed, float("-inf"))
        mask = mask.repeat(1, num_q_per_kv, 1)[:, None]
        group._masks[key] = mask
    return mask


def paged_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    meta: AttentionMetadata,
    scale: float,
    sliding_window: int | None = None,
    sinks: torch.Tensor | None = None,
) -> torch.Tensor:
    """Write k/v into the cache, then attend each query to its sequence's context.

    q: [T, Hq, D]; k, v: [T, Hkv, D]; caches: [N, bs, Hkv, D]. Returns [T, Hq, D].
    ``sliding_window`` is this layer's window (layers may differ: their masks are cached
    per window). ``sinks`` [Hq] (gpt_oss): one learned logit per head that joins the
    softmax and takes probability mass but adds no value (:func:`sink_attention`).

    GQA without repeating K/V: the G = Hq / Hkv query heads of one KV head become G times
    as many queries of that head ([B, Hkv, G * max_q, D]), so one SDPA call over Hkv heads
    reads each gathered key once (``enable_gqa`` takes a slow path on CPU).
    """
    num_kv_heads, head_dim = k_cache.shape[2:]
    k_cache.view(-1, num_kv_heads, head_dim).index_copy_(0, meta.slot_mapping, k)
    v_cache.view(-1, num_kv_heads, head_dim).index_copy_(0, meta.slot_mapping, v)
    return _attend_paged(q, k_cache, v_cache, meta, scale, sliding_window, sinks)


def paged_latent_attention(
    q: torch.Tensor,
    latent: torch.Tensor,
    cache: torch.Tensor,
    meta: AttentionMetadata,
    scale: float,
    value_dim: int,
) -> torch.Tensor:
    """Multi-head latent attention over the compressed cache (the absorbed form).

    q: [T, H, C] queries already in latent space (``[q_nope @ W_UK, q_rope]``); latent:
    [T, 1, C] the new tokens' ``[kv_a_layernorm(c_kv), k_rope]``; cache: [N, bs, 1, C].
    Every head attends to the one shared latent "head" (MQA with C-wide keys); the values
    are the first ``value_dim`` (= kv_lora_rank) dims of the same latent, so the result
    [T, H, value_dim] is still in latent space (the caller applies W_UV).
    """
    width = cache.shape[-1]
    cache.view(-1, 1, width).index_copy_(0, meta.slot_mapping, latent)
    return _attend_paged(q, cache, None, meta, scale, None)[..., :value_dim]


def _attend_paged(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor | None,
    meta: AttentionMetadata,
    scale: float,
    sliding_window: int | None,
    sinks: torch.Tensor | None = None,
) -> torch.Tensor:
    """Attend each query to its sequence's cached context (``v_cache`` None: values are
    the keys themselves, as MLA's latent is; ``sinks``: see :func:`paged_attention`)."""
    num_kv_heads, head_dim = k_cache.shape[2:]
    num_heads = q.shape[1]
    g = num_heads // num_kv_heads
    out = torch.empty_like(q)
    for group in meta.groups:
        b, max_q = group.token_idx.shape
        if max_q == 1 and sinks is None and v_cache is not None:
            rows = group.token_idx.view(-1)
            attn = kernels.decode_attention(
                q.index_select(0, rows),
                k_cache,
                v_cache,
                group.positions.view(-1),
                group.block_tables,
                scale,
                sliding_window,
            )
            if attn is not None:  # the CPU kernel (bf16): keys read in place, no mask
                out.index_copy_(0, rows, attn)
                continue
        # Gather each sequence's blocks: [B, nb, bs, Hkv, D] -> [B, Hkv, S, D]
        blocks = group.block_tables.flatten()
        keys = k_cache.index_select(0, blocks).view(b, -1, num_kv_heads, head_dim).transpose(1, 2)
        if v_cache is None:
            values = keys
        else:
            values = v_cache.index_select(0, blocks).view(b, -1, num_kv_heads, head_dim)
            values = values.transpose(1, 2)
        mask = group_mask(group, keys.shape[2], g, sliding_window, q.dtype)
        queries = (
            q[group.token_idx]  # [B, max_q, Hq, D]
            .view(b, max_q, num_kv_heads, g, head_dim)
            .permute(0, 2, 3, 1, 4)
            .reshape(b, num_kv_heads, g * max_q, head_dim)
        )
        if sinks is None:
            attn = F.scaled_dot_product_attention(
                queries, keys, values, attn_mask=mask, scale=scale
            )
        else:
            attn = sink_attention(queries, keys, values, mask, scale, sinks, max_q)
        attn = (
            attn.view(b, num_kv_heads, g, max_q, head_dim)
            .permute(0, 3, 1, 2, 4)
            .reshape(b, max_q, num_heads, head_dim)
        )
        if group.q_valid is None:
            out[group.token_idx.flatten()] = attn.flatten(0, 1)
        elif group.valid_rows is not None and group.valid_token_idx is not None:
            out.index_copy_(
                0, group.valid_token_idx, attn.flatten(0, 1).index_select(0, group.valid_rows)
            )
        else:
            out[group.token_idx[group.q_valid]] = attn[group.q_valid]
    return out


def sink_attention(
    queries: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    mask: torch.Tensor,
    scale: float,
    sinks: torch.Tensor,
    max_q: int,
) -> torch.Tensor:
    """Attention whose softmax has one extra, value-less logit per head (gpt_oss sinks).

    queries: [B, Hkv, G * max_q, D] (rows ``(g, q)``, as :func:`paged_attention` stacks
    them); keys, values: [B, Hkv, S, D]; mask: [B, 1, G * max_q, S]; sinks: [Hq] with
    ``Hq = Hkv * G``. Scores and softmax in fp32; returns [B, Hkv, G * max_q, D].
    """
    b, num_kv_heads, rows, _ = queries.shape
    g = rows // max_q
    scores = torch.matmul(queries.float(), keys.float().transpose(-1, -2)) * scale + mask
    sink = sinks.float().view(1, num_kv_heads, g, 1, 1).expand(b, -1, -1, max_q, 1)
    logits = torch.cat([scores, sink.reshape(b, num_kv_heads, rows, 1)], dim=-1)
    probs = torch.softmax(logits, dim=-1)[..., :-1]
    return torch.matmul(probs.to(values.dtype), values)
