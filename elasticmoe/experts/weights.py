"""One logical expert's weights, and the FFN they compute."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from elasticmoe.core.experts import LogicalExpert
from elasticmoe.model.checkpoint import (
    CheckpointReader,
    expert_tensor_names,
    read_expert_tensor,
    stacked_expert_tensor_names,
)
from elasticmoe.model.config import SILU, ExpertActivation, MoEModelConfig
from elasticmoe.model.moe import activate

# The tensors of an expert, by wire name (FetchExpert chunks carry these names); biases
# only where the family has them (gpt_oss).
TENSOR_NAMES = ("gate_up", "down", "gate_up_bias", "down_bias")


@dataclass
class ExpertWeights:
    """A gated expert: ``down(act(x @ gate.T [+ b_gate], x @ up.T [+ b_up])) [+ b_down]``.

    gate and up are fused into one ``gate_up`` matrix ([2*I, H], gate rows first) so each
    expert costs two matmuls instead of three. ``activation`` is SwiGLU for every family
    but gpt_oss (clamped SwiGLU, with biases); it comes from the model config, never from
    a peer, and is not part of the checksum.
    """

    gate_up: torch.Tensor  # [2*I, H]
    down: torch.Tensor  # [H, I]
    gate_up_bias: torch.Tensor | None = None  # [2*I]
    down_bias: torch.Tensor | None = None  # [H]
    activation: ExpertActivation = SILU

    @property
    def intermediate_size(self) -> int:
        """I, the expert's hidden width."""
        return self.down.shape[1]

    def tensors(self) -> dict[str, torch.Tensor]:
        """The tensors this expert holds, by wire name, in :data:`TENSOR_NAMES` order."""
        out = {"gate_up": self.gate_up, "down": self.down}
        if self.gate_up_bias is not None:
            out["gate_up_bias"] = self.gate_up_bias
        if self.down_bias is not None:
            out["down_bias"] = self.down_bias
        return out

    @classmethod
    def from_tensors(
        cls, tensors: dict[str, torch.Tensor], activation: ExpertActivation = SILU
    ) -> ExpertWeights:
        """Inverse of :meth:`tensors`."""
        return cls(
            tensors["gate_up"],
            tensors["down"],
            tensors.get("gate_up_bias"),
            tensors.get("down_bias"),
            activation,
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Apply the expert to rows ``x`` ([N, H]) -> [N, H]."""
        h = F.linear(x, self.gate_up, self.gate_up_bias)
        return F.linear(activate(h, self.activation), self.down, self.down_bias)

    def checksum(self) -> str:
        """sha256 of the raw bytes, used to verify a copied replica."""
        h = hashlib.sha256()
        for t in self.tensors().values():
            h.update(t.detach().contiguous().cpu().view(torch.uint8).numpy().tobytes())
        return h.hexdigest()

    def nbytes(self) -> int:
        """Memory the replica occupies."""
        return sum(t.numel() * t.element_size() for t in self.tensors().values())

    def to(self, device: torch.device | str, dtype: torch.dtype | None = None) -> ExpertWeights:
        """A copy on ``device`` (and ``dtype``)."""
        moved = {name: t.to(device, dtype) for name, t in self.tensors().items()}
        return ExpertWeights.from_tensors(moved, self.activation)


def expert_tensor_shapes(config: MoEModelConfig) -> dict[str, tuple[int, ...]]:
    """Shape of each tensor of an expert of this model, by wire name."""
    hidden, inter = config.hidden_size, config.expert_intermediate_size
    shapes: dict[str, tuple[int, ...]] = {"gate_up": (2 * inter, hidden), "down": (hidden, inter)}
    if config.expert_bias:
        shapes.update(gate_up_bias=(2 * inter,), down_bias=(hidden,))
    return shapes


def load_expert_weights(
    reader: CheckpointReader,
    config: MoEModelConfig,
    expert: LogicalExpert,
    dtype: torch.dtype,
    device: torch.device | str = "cpu",
) -> ExpertWeights:
    """Read one logical expert from the checkpoint (only its own tensors, or its slices of
    the layer's stacked tensors)."""
    if not config.is_moe_layer(expert.layer) or not 0 <= expert.expert < config.num_experts:
        raise ValueError(
            f"expert {expert} does not exist: MoE layers are {list(config.moe_layers)}, "
            f"experts 0..{config.num_experts - 1}"
        )
    hidden, inter = config.hidden_size, config.expert_intermediate_size
    if config.stacked_experts:
        return _load_stacked_expert(reader, config, expert, dtype, device)
    gate_name, up_name, down_name = expert_tensor_names(config, *expert)
    gate = reader.get(gate_name, (inter, hidden), dtype, device)
    up = reader.get(up_name, (inter, hidden), dtype, device)
    down = reader.get(down_name, (hidden, inter), dtype, device)
    return ExpertWeights(torch.cat([gate, up], dim=0).contiguous(), down.contiguous())


def _load_stacked_expert(
    reader: CheckpointReader,
    config: MoEModelConfig,
    expert: LogicalExpert,
    dtype: torch.dtype,
    device: torch.device | str,
) -> ExpertWeights:
    """gpt_oss: this expert's slices of the stacked (dense or MXFP4) tensors.

    The checkpoint's gate_up [H, 2I] interleaves gate and up columns (gate at even, up at
    odd); they are split into our [2I, H] (gate rows, then up rows) and [H, I] layout.
    """
    hidden, inter = config.hidden_size, config.expert_intermediate_size
    names = stacked_expert_tensor_names(config, expert.layer)
    e = expert.expert

    def read(key: str, shape: tuple[int, ...]) -> torch.Tensor:
        return read_expert_tensor(reader, names[key], e, shape, dtype, device)

    gate_up = read("gate_up", (hidden, 2 * inter))
    gate_up_bias = read("gate_up_bias", (2 * inter,))
    down = read("down", (inter, hidden))
    down_bias = read("down_bias", (hidden,))
    return ExpertWeights(
        torch.cat([gate_up[:, 0::2], gate_up[:, 1::2]], dim=1).t().contiguous(),
        down.t().contiguous(),
        torch.cat([gate_up_bias[0::2], gate_up_bias[1::2]]).contiguous(),
        down_bias.contiguous(),
        config.expert_activation,
    )
