"""Top-k gating as a pure function (no module state, no side effects)."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class GateOutput:
    """Result of routing T token rows to k of E experts.

    weights: [T, k] combine weights in the hidden dtype.
    indices: [T, k] logical expert ids within the layer.
    tokens_per_expert: [E] number of (token, slot) pairs routed to each expert.
    """

    weights: torch.Tensor
    indices: torch.Tensor
    tokens_per_expert: torch.Tensor


def _count(indices: torch.Tensor, num_experts: int) -> torch.Tensor:
    """[E] number of (token, slot) pairs routed to each expert."""
    flat = indices.flatten()
    # not bincount: on CUDA it reads the max id back to the host to size its output
    tokens_per_expert = torch.zeros(num_experts, dtype=torch.long, device=flat.device)
    tokens_per_expert.scatter_add_(0, flat, torch.ones_like(flat))
    return tokens_per_expert


def topk_softmax_gate(
    router_logits: torch.Tensor, top_k: int, renormalize: bool, out_dtype: torch.dtype
) -> GateOutput:
    """Softmax over all experts in fp32, keep the top k, optionally renormalise.

    This is the gate of mixtral (always renormalised), qwen2_moe/qwen3_moe and
    olmoe (renormalised when ``norm_topk_prob``).
    """
    num_experts = router_logits.shape[-1]
    probs = torch.softmax(router_logits.float(), dim=-1)
    weights, indices = torch.topk(probs, top_k, dim=-1)
    if renormalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return GateOutput(weights.to(out_dtype), indices, _count(indices, num_experts))


def grouped_topk_sigmoid_gate(
    router_logits: torch.Tensor,
    correction_bias: torch.Tensor,
    top_k: int,
    n_group: int,
    topk_group: int,
    renormalize: bool,
    scaling_factor: float,
    out_dtype: torch.dtype,
) -> GateOutput:
    """Sigmoid scores with bias-corrected, group-limited top-k (deepseek_v3, glm4_moe).

    Scores are ``sigmoid(logits)`` in fp32. ``correction_bias`` [E] is added for choosing the
    experts only; the weights are the unbiased scores of the chosen ones. The E experts form
    ``n_group`` equal groups; a group's score is the sum of its two best biased scores, and
    only the ``topk_group`` best groups may be picked from. The k weights are renormalised
    (with transformers' 1e-20 epsilon) when ``renormalize``, then multiplied by
    ``scaling_factor``, in that order.
    """
    num_tokens, num_experts = router_logits.shape
    scores = torch.sigmoid(router_logits.float())
    biased = scores + correction_bias.float()
    grouped = biased.view(num_tokens, n_group, num_experts // n_group)
    group_scores = grouped.topk(min(2, grouped.shape[-1]), dim=-1)[0].sum(dim=-1)  # [T, G]
    group_idx = torch.topk(group_scores, topk_group, dim=-1, sorted=False)[1]
    group_keep = torch.zeros_like(group_scores, dtype=torch.bool)
    group_keep.scatter_(1, group_idx, True)
    expert_keep = group_keep.repeat_interleave(num_experts // n_group, dim=-1)  # [T, E]
    biased = biased.masked_fill(~expert_keep, float("-inf"))
    indices = torch.topk(biased, top_k, dim=-1, sorted=False)[1]
    weights = scores.gather(1, indices)
    if renormalize:
        weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
    weights = weights * scaling_factor
    return GateOutput(weights.to(out_dtype), indices, _count(indices, num_experts))


def topk_logits_softmax_gate(
    router_logits: torch.Tensor, top_k: int, out_dtype: torch.dtype
) -> GateOutput:
    """Keep the top k logits, then softmax over those k in fp32 (gpt_oss's router).

    The router's bias is already in ``router_logits``; the weights of a token's k experts
    sum to one by construction.
    """
    num_experts = router_logits.shape[-1]
    top, indices = torch.topk(router_logits.float(), top_k, dim=-1)
    weights = torch.softmax(top, dim=-1)
    return GateOutput(weights.to(out_dtype), indices, _count(indices, num_experts))
