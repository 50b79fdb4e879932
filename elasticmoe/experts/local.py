"""Experts in the engine's own process: the correctness reference and the baseline."""

from __future__ import annotations

import torch

from elasticmoe.core.experts import LogicalExpert
from elasticmoe.experts.weights import ExpertWeights, load_expert_weights
from elasticmoe.model.checkpoint import CheckpointReader
from elasticmoe.model.config import MoEModelConfig
from elasticmoe.model.gate import GateOutput
from elasticmoe.model.kernels import pack_experts, widen_experts
from elasticmoe.model.moe import combine_expert_outputs, fused_experts, group_by_expert


class LocalExperts:
    """All experts in the engine's own process: no Ray, no gRPC.

    A layer whose experts 0..E-1 are all present keeps them stacked (``w13`` [E, 2I, H],
    ``w2`` [E, H, I], on CPU as transposed views of [E, H, 2I] / [E, I, H] buffers; each
    :class:`ExpertWeights` is a view into the stack) and runs them with
    :func:`fused_experts` (with biases [E, 2I] / [E, H] where the family has them); any
    other layer falls back to one call per expert.
    """

    def __init__(self, experts: dict[LogicalExpert, ExpertWeights]) -> None:
        by_layer: dict[int, list[int]] = {}
        for key in experts:
            by_layer.setdefault(key.layer, []).append(key.expert)
        self.experts = dict(experts)
        # layer -> (w13, w2, b13, b2, activation, packed), the arguments of fused_experts
        self.stacked: dict[int, tuple] = {}
        for layer, ids in by_layer.items():
            if sorted(ids) != list(range(len(ids))):
                continue
            layer_experts = [experts[LogicalExpert(layer, e)] for e in range(len(ids))]
            w13 = torch.stack([w.gate_up for w in layer_experts])
            w2 = torch.stack([w.down for w in layer_experts])
            if w13.device.type == "cpu":
                # CPU matmuls read a row-major [K, N] right operand ~1.3-1.5x faster than a
                # transposed view (bf16, measured): keep that layout in memory, same shapes.
                w13 = w13.transpose(1, 2).contiguous().transpose(1, 2)
                w2 = w2.transpose(1, 2).contiguous().transpose(1, 2)
            b13 = b2 = None
            if layer_experts[0].gate_up_bias is not None:
                b13 = torch.stack([w.gate_up_bias for w in layer_experts])
            if layer_experts[0].down_bias is not None:
                b2 = torch.stack([w.down_bias for w in layer_experts])
            activation = layer_experts[0].activation
            packed = pack_experts(w13, w2, b13, b2, activation.name) or widen_experts(w13, w2)
            self.stacked[layer] = (w13, w2, b13, b2, activation, packed)
            for e in range(len(ids)):
                self.experts[LogicalExpert(layer, e)] = ExpertWeights(
                    w13[e],
                    w2[e],
                    None if b13 is None else b13[e],
                    None if b2 is None else b2[e],
                    activation,
                )

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
        """The layer's routed experts, combined with the gate weights."""
        stacked = self.stacked.get(layer)
        if stacked is not None:
            return fused_experts(hidden, gate, *stacked)
        return self.forward_per_expert(layer, hidden, gate)

    def forward_per_expert(
        self, layer: int, hidden: torch.Tensor, gate: GateOutput
    ) -> torch.Tensor:
        """Run each selected expert once on its rows (one call per expert, the reference)."""
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
