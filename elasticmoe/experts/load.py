"""Expert load statistics: tokens routed to each logical expert, per step.

The model calls :meth:`ExpertLoadRecorder.record` once per MoE layer with the
gate's counts (kept on the device, no sync); the engine calls
:meth:`ExpertLoadRecorder.end_step` once per step, which moves the step's
counts to the host. The autoscaler reads windows of these.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass

import numpy as np
import torch


@dataclass
class LoadSample:
    """Tokens per logical expert in one step: ``counts[i, e]`` for MoE layer ``layers[i]``."""

    timestamp: float
    counts: np.ndarray  # [num_moe_layers, num_experts] int64


class ExpertLoadRecorder:
    """Accumulates per-step tokens per logical expert and keeps a bounded history."""

    def __init__(
        self,
        moe_layers: tuple[int, ...],
        num_experts: int,
        device: torch.device | str,
        history: int = 4096,
    ) -> None:
        self.moe_layers = moe_layers
        self.layer_to_row = {layer: i for i, layer in enumerate(moe_layers)}
        self.num_experts = num_experts
        self._step = torch.zeros(len(moe_layers), num_experts, dtype=torch.int64, device=device)
        self.total = np.zeros((len(moe_layers), num_experts), dtype=np.int64)
        self.samples: deque[LoadSample] = deque(maxlen=history)

    def record(self, layer: int, tokens_per_expert: torch.Tensor) -> None:
        """Add one layer's gate counts for the current step."""
        self._step[self.layer_to_row[layer]] += tokens_per_expert

    def end_step(self) -> LoadSample:
        """Close the step: move its counts to the host and start a new one."""
        counts = self._step.cpu().numpy().copy()
        self._step.zero_()
        self.total += counts
        sample = LoadSample(time.time(), counts)
        self.samples.append(sample)
        return sample

    def window(self, seconds: float, now: float | None = None) -> np.ndarray:
        """Sum of counts over the last ``seconds``."""
        now = time.time() if now is None else now
        out = np.zeros_like(self.total)
        for sample in reversed(self.samples):
            if sample.timestamp < now - seconds:
                break
            out += sample.counts
        return out
