"""The interface the model's MoE layers call, and the arithmetic every backend shares.

The model hands each MoE layer's token rows and gate output to an
:class:`ExpertBackend`. ``elasticmoe.experts.local.LocalExperts`` computes in-process (the
correctness reference and the baseline); the router in ``elasticmoe.router`` sends the same
rows to expert workers. The model never knows which. Grouping pairs by expert, the batched
expert FFN and the combine live here so that every backend sums in the same order.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Protocol

import torch
import torch.nn.functional as F

from elasticmoe.model.config import SILU, ExpertActivation
from elasticmoe.model.gate import GateOutput
from elasticmoe.model.kernels import PackedExperts, moe_pairs


class ExpertBackend(Protocol):
    """Computes ``sum_k weights[t, k] * expert_{indices[t, k]}(hidden[t])`` for a layer."""

    def forward(self, layer: int, hidden: torch.Tensor, gate: GateOutput) -> torch.Tensor:
        """hidden: [T, H]; returns [T, H]."""
        ...

    def begin_step(self) -> None:
        """Engine step boundary: a remote backend switches to the newest expert map."""
        ...

    # Optional, asynchronous form (a remote backend has it; see :func:`submit_experts`):
    # ``submit(layer, hidden, gate) -> handle`` starts the layer and returns at once,
    # ``wait(handle) -> [T, H]`` gives its result; between the two the caller computes
    # something else (the shared expert, another micro-batch).
    # Optional ``lost_rows``: [(rows, error)] of the current step, token rows whose experts
    # had no live replica (their output lacks those experts); the engine fails the requests
    # owning them. A wrapper around a remote backend must pass it through.

    def end_step(self) -> None:
        """The step's last layer is done."""
        ...


@dataclass
class _Done:
    """The handle of a backend without ``submit``: the result, computed at once."""

    out: torch.Tensor


def submit_experts(
    backend: ExpertBackend, layer: int, hidden: torch.Tensor, gate: GateOutput
) -> Any:
    """Start the layer's routed experts: ``backend.submit`` if it has one (the result comes
    later, from :func:`wait_experts`), else ``backend.forward`` right now."""
    submit = getattr(backend, "submit", None)
    if submit is None:
        return _Done(backend.forward(layer, hidden, gate))
    return submit(layer, hidden, gate)


def wait_experts(backend: ExpertBackend, handle: Any) -> torch.Tensor:
    """The result of :func:`submit_experts`."""
    if isinstance(handle, _Done):
        return handle.out
    return backend.wait(handle)  # type: ignore[attr-defined]


@dataclass
class ExpertGroups:
    """Token rows grouped by logical expert, in ascending expert order.

    token_idx: [T*k] the token row of each (token, slot) pair, sorted by expert
      (token order kept within an expert).
    weights: [T*k] the matching combine weights.
    counts: per expert, how many pairs; ``counts[e]`` pairs for expert e follow
      those of expert e-1 in ``token_idx``.
    """

    token_idx: torch.Tensor
    weights: torch.Tensor
    counts: list[int]

    def ranges(self) -> Iterable[tuple[int, int, int]]:
        """(expert, start, end) for each expert with at least one row."""
        start = 0
        for expert, count in enumerate(self.counts):
            if count:
                yield expert, start, start + count
            start += count


def activate(h: torch.Tensor, activation: ExpertActivation = SILU) -> torch.Tensor:
    """The expert activation on ``h`` [..., 2I] (gate then up halves) -> [..., I]."""
    g, u = h.chunk(2, dim=-1)
    if activation.name == "silu":
        return F.silu(g) * u
    # gpt_oss (transformers' GptOssExperts._apply_gate, with gate and up de-interleaved)
    g = g.clamp(max=activation.limit)
    u = u.clamp(-activation.limit, activation.limit)
    return (u + 1) * (g * torch.sigmoid(g * activation.alpha))


def combine_expert_outputs(
    groups: ExpertGroups, outputs: torch.Tensor, out: torch.Tensor
) -> torch.Tensor:
    """out[t] += weight * expert output, for all pairs in expert-grouped order.

    Local and remote backends both combine here, in the same order, so their
    results are bit-identical.
    """
    return _combine(groups.token_idx, groups.weights, outputs, out)


def _combine(
    token_idx: torch.Tensor,
    weights: torch.Tensor,
    outputs: torch.Tensor,
    out: torch.Tensor,
    uniform: bool = True,
) -> torch.Tensor:
    """The one place pairs are summed into tokens, in ascending expert order per token.

    When every token has the same number k of pairs (the gate's top-k), the pairs are
    regrouped by token and added slot by slot: the same additions, in the same order, as
    ``out.index_add_(0, token_idx, weighted)`` (bit for bit), but in k wide vector adds
    instead of one serial loop over pairs, which is slow on CPU for large batches.
    ``uniform=False`` says tokens may have different numbers of pairs (a worker's share).
    """
    weighted = outputs * weights[:, None]
    num_tokens = out.shape[0]
    num_pairs = token_idx.numel()
    if not uniform or num_tokens == 0 or num_pairs % num_tokens:
        return out.index_add_(0, token_idx, weighted)
    top_k = num_pairs // num_tokens
    # stable: a token's pairs keep their (ascending expert) order
    by_token = weighted.index_select(0, torch.argsort(token_idx, stable=True))
    by_token = by_token.view(num_tokens, top_k, -1)
    for j in range(top_k):
        out += by_token[:, j]
    return out


def group_by_expert(gate: GateOutput) -> ExpertGroups:
    """Sort (token, slot) pairs by expert so each expert sees one contiguous batch."""
    top_k = gate.indices.shape[1]
    order = torch.argsort(gate.indices.flatten(), stable=True)
    return ExpertGroups(
        token_idx=order // top_k,
        weights=gate.weights.flatten()[order],
        counts=gate.tokens_per_expert.tolist(),
    )


# Padding every expert's rows to the busiest expert's count costs E * max_rows rows of matmul
# for num_pairs useful ones. While the rows per expert are few, a padded bmm costs what reading
# the stacked weights costs whatever the padding (measured on CPU, bf16, issue-13 Mixtral:
# 0.7 ms per layer from 1 to 32 rows per expert), so padding is only "wasteful" past both
# limits below.
PAD_WASTE_LIMIT = 2.0
PAD_FREE_ROWS = 64


def _use_grouped_mm(x: torch.Tensor, counts: torch.Tensor, num_pairs: int) -> tuple[bool, int]:
    """``(use torch._grouped_mm, max rows per expert)`` for one layer's pairs.

    On CUDA (bf16, sm90+) always grouped_mm: it needs no host synchronisation (the row count
    is then not read, 0). On CPU torch runs grouped_mm as one matmul per expert in C++, each
    about twice as slow per row as the same rows in one bmm; it wins only when there are
    fewer pairs than experts (decode at batch 1-4: the bmm would read every expert's weights)
    and when routing is so uneven that padding multiplies a large row count.
    """
    has_gmm = hasattr(torch, "_grouped_mm")
    cuda_gmm = x.is_cuda and has_gmm and x.dtype == torch.bfloat16
    if cuda_gmm and torch.cuda.get_device_capability(x.device)[0] >= 9:
        return True, 0
    max_rows = int(counts.max())  # the one host read per layer, free on CPU
    if not has_gmm or x.device.type != "cpu":
        return False, max_rows
    num_experts = counts.numel()
    wasteful = max_rows > PAD_FREE_ROWS and num_experts * max_rows > PAD_WASTE_LIMIT * num_pairs
    return num_pairs < num_experts or wasteful, max_rows


def fused_experts(
    hidden: torch.Tensor,
    gate: GateOutput,
    w13: torch.Tensor,
    w2: torch.Tensor,
    b13: torch.Tensor | None = None,
    b2: torch.Tensor | None = None,
    activation: ExpertActivation = SILU,
    packed: PackedExperts | None = None,
) -> torch.Tensor:
    """All routed experts of one layer in one batched call, no Python loop over experts.

    hidden: [T, H]; w13: [E, 2I, H] (gate and up stacked); w2: [E, H, I]; optional biases
    b13: [E, 2I], b2: [E, H] and the experts' :class:`ExpertActivation`. Pairs are sorted
    by expert (as :func:`group_by_expert` does) and combined by the same
    :func:`combine_expert_outputs` arithmetic, so the result matches the per-expert path and
    the remote backend up to matmul rounding (oneDNN runs a one-row matmul as a GEMV,
    which may round a bf16 result one step differently from the same row in a bmm).

    Either ``torch._grouped_mm`` over the sorted pairs with per-expert offsets (no host
    synchronisation; see :func:`_use_grouped_mm` for when), or each expert's rows padded to
    the busiest expert's count and run as one ``torch.bmm`` over the stacked weights (one
    host read of that count per layer, free on CPU). ``packed`` (the same weights packed by
    :func:`elasticmoe.model.kernels.pack_experts`): the CPU kernel, same roundings; or
    their fp32 copies (:func:`~elasticmoe.model.kernels.widen_experts`): these matmuls in
    fp32, each result rounded to bf16.
    """
    top_k = gate.indices.shape[1]
    flat = gate.indices.flatten()
    if _kernel_applies(packed, hidden, gate.weights):  # pairs in the gate's [T, k] layout
        return moe_pairs(hidden, None, flat, gate.weights.flatten(), packed, False)
    order = torch.argsort(flat, stable=True)
    return _fused_sorted(
        hidden,
        order // top_k,
        flat[order],
        gate.weights.flatten()[order],
        gate.tokens_per_expert,
        *_matmul_weights(packed, hidden, w13, w2),
        uniform=True,
        b13=b13,
        b2=b2,
        activation=activation,
    )


def fused_expert_pairs(
    hidden: torch.Tensor,
    token_idx: torch.Tensor,
    expert_idx: torch.Tensor,
    weights: torch.Tensor,
    w13: torch.Tensor,
    w2: torch.Tensor,
    b13: torch.Tensor | None = None,
    b2: torch.Tensor | None = None,
    activation: ExpertActivation = SILU,
    packed: PackedExperts | None = None,
) -> torch.Tensor:
    """:func:`fused_experts` for any set of (token row, expert, weight) pairs.

    A worker's share of a layer: ``expert_idx`` indexes the stacked ``w13``/``w2`` of the
    experts it holds, a token may have any number of pairs (>= 0). Returns [T, H], per
    token the weighted sum over its pairs, added in ascending expert order.
    """
    if _kernel_applies(packed, hidden, weights):
        return moe_pairs(hidden, token_idx, expert_idx, weights, packed, True)
    order = torch.argsort(expert_idx, stable=True)
    sorted_experts = expert_idx[order]
    counts = torch.bincount(sorted_experts, minlength=w13.shape[0])
    return _fused_sorted(
        hidden,
        token_idx[order],
        sorted_experts,
        weights[order],
        counts,
        *_matmul_weights(packed, hidden, w13, w2),
        uniform=False,
        b13=b13,
        b2=b2,
        activation=activation,
    )


def _kernel_applies(
    packed: PackedExperts | None, hidden: torch.Tensor, weights: torch.Tensor
) -> bool:
    """Whether the packed CPU kernel computes this call (bf16 rows and gate weights on CPU;
    anything else, e.g. fp32 gate weights, keeps the torch path and its arithmetic)."""
    return (
        packed is not None
        and not packed.fp32
        and hidden.device.type == "cpu"
        and hidden.dtype == torch.bfloat16
        and weights.dtype == torch.bfloat16
    )


def _matmul_weights(
    packed: PackedExperts | None, hidden: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """The expert weights the matmuls read: the fp32 copies
    (:func:`~elasticmoe.model.kernels.widen_experts`) for bf16 rows on a CPU without bf16
    dot products, else the stacked weights themselves."""
    if packed is not None and packed.fp32 and hidden.dtype == torch.bfloat16:
        return packed.w13, packed.w2
    return w13, w2


def _matmul(x: torch.Tensor, w: torch.Tensor, offs: torch.Tensor | None = None) -> torch.Tensor:
    """``x @ w`` batched by expert (``torch.bmm``; ``offs``: ``torch._grouped_mm`` over
    sorted rows) in ``x``'s dtype. fp32 weights for bf16 rows (widened, see
    :func:`_matmul_weights`): multiplied in fp32, the result rounded to bf16, as a bf16
    matmul rounds its fp32 accumulator."""
    widened = w.dtype == torch.float32 and x.dtype == torch.bfloat16
    a = x.float() if widened else x
    y = torch.bmm(a, w) if offs is None else torch._grouped_mm(a, w, offs=offs)
    return y.to(x.dtype) if widened else y


def _fused_sorted(
    hidden: torch.Tensor,
    token_idx: torch.Tensor,
    sorted_experts: torch.Tensor,
    weights: torch.Tensor,
    counts: torch.Tensor,
    w13: torch.Tensor,
    w2: torch.Tensor,
    uniform: bool,
    b13: torch.Tensor | None = None,
    b2: torch.Tensor | None = None,
    activation: ExpertActivation = SILU,
) -> torch.Tensor:
    """The batched FFN over pairs already sorted by expert, then the combine."""
    num_experts = w13.shape[0]
    num_pairs = token_idx.numel()
    if num_pairs == 0:
        return torch.zeros_like(hidden)
    x = hidden.index_select(0, token_idx)  # [N, H] rows in expert order
    grouped, max_rows = _use_grouped_mm(hidden, counts, num_pairs)
    if grouped:
        offs = torch.cumsum(counts, 0, dtype=torch.int32)
        h = _matmul(x, w13.transpose(1, 2), offs)
        if b13 is not None:
            h = h + b13.index_select(0, sorted_experts)
        y = _matmul(activate(h, activation), w2.transpose(1, 2), offs)
        if b2 is not None:
            y = y + b2.index_select(0, sorted_experts)
        return _combine(token_idx, weights, y, torch.zeros_like(hidden), uniform)

    starts = torch.cumsum(counts, 0) - counts
    rank = torch.arange(num_pairs, device=hidden.device) - starts[sorted_experts]
    row = sorted_experts * max_rows + rank
    # Padding rows are never read back, and a matmul row depends only on its own input row.
    xp = hidden.new_empty(num_experts * max_rows, hidden.shape[1])
    xp.index_copy_(0, row, x)
    h = _matmul(xp.view(num_experts, max_rows, -1), w13.transpose(1, 2))
    if b13 is not None:
        h = h + b13[:, None, :]
    y = _matmul(activate(h, activation), w2.transpose(1, 2))
    if b2 is not None:
        y = y + b2[:, None, :]
    y = y.view(num_experts * max_rows, -1)
    return _combine(token_idx, weights, y.index_select(0, row), torch.zeros_like(hidden), uniform)
