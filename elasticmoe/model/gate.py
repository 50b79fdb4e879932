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
    flat = indices.flatten()
    # not bincount: on CUDA it reads the max id back to the host to size its output
    tokens_per_expert = torch.zeros(num_experts, dtype=torch.long, device=flat.device)
    tokens_per_expert.scatter_add_(0, flat, torch.ones_like(flat))
    return GateOutput(weights.to(out_dtype), indices, tokens_per_expert)


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
    flat = indices.flatten()
    tokens_per_expert = torch.zeros(num_experts, dtype=torch.long, device=flat.device)
    tokens_per_expert.scatter_add_(0, flat, torch.ones_like(flat))
    return GateOutput(weights.to(out_dtype), indices, tokens_per_expert)
