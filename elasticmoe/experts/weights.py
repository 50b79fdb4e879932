"""One logical expert's weights, and the FFN they compute."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from elasticmoe.core.experts import LogicalExpert
from elasticmoe.model.checkpoint import CheckpointReader, expert_tensor_names
from elasticmoe.model.config import MoEModelConfig


@dataclass
class ExpertWeights:
    """A SwiGLU expert: ``down(silu(x @ gate.T) * (x @ up.T))``.

    gate and up are fused into one ``gate_up`` matrix ([2*I, H]) so each
    expert costs two matmuls instead of three.
    """

    gate_up: torch.Tensor  # [2*I, H]
    down: torch.Tensor  # [H, I]

    @property
    def intermediate_size(self) -> int:
        """I, the expert's hidden width."""
        return self.down.shape[1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Apply the expert to rows ``x`` ([N, H]) -> [N, H]."""
        gate, up = F.linear(x, self.gate_up).chunk(2, dim=-1)
        return F.linear(F.silu(gate) * up, self.down)

    def checksum(self) -> str:
        """sha256 of the raw bytes, used to verify a copied replica."""
        h = hashlib.sha256()
        for t in (self.gate_up, self.down):
            h.update(t.detach().contiguous().cpu().view(torch.uint8).numpy().tobytes())
        return h.hexdigest()

    def nbytes(self) -> int:
        """Memory the replica occupies."""
        return sum(t.numel() * t.element_size() for t in (self.gate_up, self.down))

    def to(self, device: torch.device | str, dtype: torch.dtype | None = None) -> ExpertWeights:
        """A copy on ``device`` (and ``dtype``)."""
        return ExpertWeights(self.gate_up.to(device, dtype), self.down.to(device, dtype))


def load_expert_weights(
    reader: CheckpointReader,
    config: MoEModelConfig,
    expert: LogicalExpert,
    dtype: torch.dtype,
    device: torch.device | str = "cpu",
) -> ExpertWeights:
    """Read one logical expert from the checkpoint (only its three tensors)."""
    if not config.is_moe_layer(expert.layer) or not 0 <= expert.expert < config.num_experts:
        raise ValueError(
            f"expert {expert} does not exist: MoE layers are {list(config.moe_layers)}, "
            f"experts 0..{config.num_experts - 1}"
        )
    hidden, inter = config.hidden_size, config.expert_intermediate_size
    gate_name, up_name, down_name = expert_tensor_names(config, *expert)
    gate = reader.get(gate_name, (inter, hidden), dtype, device)
    up = reader.get(up_name, (inter, hidden), dtype, device)
    down = reader.get(down_name, (hidden, inter), dtype, device)
    return ExpertWeights(torch.cat([gate, up], dim=0).contiguous(), down.contiguous())
