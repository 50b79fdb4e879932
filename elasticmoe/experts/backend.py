"""Where expert FFNs run, behind one interface the model calls.

The model hands each MoE layer's token rows and gate output to an
:class:`ExpertBackend`. :class:`LocalExperts` computes in-process (the
correctness reference and the baseline); the router in ``elasticmoe.router``
sends the same rows to expert workers. The model never knows which.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Protocol

import torch

from elasticmoe.core.experts import LogicalExpert
from elasticmoe.experts.weights import ExpertWeights, load_expert_weights
from elasticmoe.model.checkpoint import CheckpointReader
from elasticmoe.model.config import MoEModelConfig
from elasticmoe.model.gate import GateOutput


class ExpertBackend(Protocol):
    """Computes ``sum_k weights[t, k] * expert_{indices[t, k]}(hidden[t])`` for a layer."""

    def forward(self, layer: int, hidden: torch.Tensor, gate: GateOutput) -> torch.Tensor:
        """hidden: [T, H]; returns [T, H]."""
        ...

    def begin_step(self) -> None:
        """Engine step boundary: a remote backend switches to the newest expert map."""
        ...

    def end_step(self) -> None:
        """The step's last layer is done."""
        ...


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


def combine_expert_outputs(
    groups: ExpertGroups, outputs: torch.Tensor, out: torch.Tensor
) -> torch.Tensor:
    """out[t] += weight * expert output, for all pairs in expert-grouped order.

    Local and remote backends both combine here, in the same order, so their
    results are bit-identical.
    """
    return out.index_add_(0, groups.token_idx, outputs * groups.weights[:, None])


def group_by_expert(gate: GateOutput) -> ExpertGroups:
    """Sort (token, slot) pairs by expert so each expert sees one contiguous batch."""
    top_k = gate.indices.shape[1]
    order = torch.argsort(gate.indices.flatten(), stable=True)
    return ExpertGroups(
        token_idx=order // top_k,
        weights=gate.weights.flatten()[order],
        counts=gate.tokens_per_expert.tolist(),
    )


class LocalExperts:
    """All experts in the engine's own process: no Ray, no gRPC."""

    def __init__(self, experts: dict[LogicalExpert, ExpertWeights]) -> None:
        self.experts = experts

    @classmethod
    def from_checkpoint(
        cls,
        reader: CheckpointReader,
        config: MoEModelConfig,
        dtype: torch.dtype,
        device: torch.device | str,
    ) -> LocalExperts:
        """Load every logical expert of every MoE layer."""
        experts = {
            LogicalExpert(layer, e): load_expert_weights(
                reader, config, LogicalExpert(layer, e), dtype, device
            )
            for layer in config.moe_layers
            for e in range(config.num_experts)
        }
        return cls(experts)

    def forward(self, layer: int, hidden: torch.Tensor, gate: GateOutput) -> torch.Tensor:
        """Run each selected expert once on its rows and combine with the gate weights."""
        groups = group_by_expert(gate)
        outputs = torch.empty(
            (groups.token_idx.numel(), hidden.shape[1]), dtype=hidden.dtype, device=hidden.device
        )
        for expert, start, end in groups.ranges():
            rows = groups.token_idx[start:end]
            outputs[start:end] = self.experts[LogicalExpert(layer, expert)].forward(hidden[rows])
        return combine_expert_outputs(groups, outputs, torch.zeros_like(hidden))

    def begin_step(self) -> None:
        """Local experts never move."""

    def end_step(self) -> None:
        """Nothing to release."""
