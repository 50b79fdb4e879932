"""Rotary position embeddings: the default RoPE and YaRN, half-split and interleaved.

``rotary_cos_sin`` builds the per-token cos/sin tables once per step (shared by every
layer); ``apply_rotary`` rotates the half-split layout (llama, mixtral, qwen, olmoe,
gpt-oss), ``apply_rotary_interleaved`` the pairwise layout deepseek's checkpoints use
(``rope_interleave``). The tables are ``cat(freqs, freqs)`` in both cases, as in
Hugging Face transformers, so one table serves either layout.

YaRN (https://arxiv.org/abs/2309.00071) follows transformers' ``_compute_yarn_parameters``:
the inverse frequencies blend interpolation (``/ factor``) and extrapolation over a linear
ramp between the correction dims of ``beta_fast`` and ``beta_slow``, and cos/sin are
multiplied by the attention factor (``get_mscale(factor, mscale) /
get_mscale(factor, mscale_all_dim)``, or ``0.1 ln(factor) + 1`` without them).
"""

from __future__ import annotations

import math

import torch

from elasticmoe.model.config import ROPE_TYPES, RopeScaling

__all__ = [
    "ROPE_TYPES",
    "RopeScaling",
    "apply_rotary",
    "apply_rotary_interleaved",
    "inv_frequencies",
    "rotary_cos_sin",
    "softmax_scale_mscale",
    "yarn_get_mscale",
]


def yarn_get_mscale(scale: float, mscale: float = 1.0) -> float:
    """YaRN's magnitude correction for a context ``scale`` (1 when not extended)."""
    if scale <= 1:
        return 1.0
    return 0.1 * mscale * math.log(scale) + 1.0


def softmax_scale_mscale(scaling: RopeScaling | None) -> float:
    """The factor deepseek multiplies its softmax scale by: ``get_mscale(factor,
    mscale_all_dim) ** 2`` under YaRN with ``mscale_all_dim`` set, else 1."""
    if scaling is None or scaling.rope_type == "default" or not scaling.mscale_all_dim:
        return 1.0
    m = yarn_get_mscale(scaling.factor, scaling.mscale_all_dim)
    return m * m


def inv_frequencies(
    dim: int, theta: float, scaling: RopeScaling | None = None, device: torch.device | None = None
) -> tuple[torch.Tensor, float]:
    """The inverse frequencies [dim // 2] (fp32) and the cos/sin multiplier."""
    pos_freqs = theta ** (torch.arange(0, dim, 2, device=device).float() / dim)
    if scaling is None or scaling.rope_type == "default":
        return 1.0 / pos_freqs, 1.0
    if scaling.rope_type != "yarn":
        raise ValueError(f"rope_type={scaling.rope_type!r} is not one of {ROPE_TYPES}")
    s = scaling
    attention_factor = s.attention_factor
    if attention_factor is None:
        if s.mscale and s.mscale_all_dim:
            attention_factor = yarn_get_mscale(s.factor, s.mscale) / yarn_get_mscale(
                s.factor, s.mscale_all_dim
            )
        else:
            attention_factor = yarn_get_mscale(s.factor)

    def correction_dim(num_rotations: float) -> float:
        return (
            dim * math.log(s.original_max_position_embeddings / (num_rotations * 2 * math.pi))
        ) / (2 * math.log(theta))

    low, high = correction_dim(s.beta_fast), correction_dim(s.beta_slow)
    if s.truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001  # no zero-width ramp
    ramp = ((torch.arange(dim // 2, device=device).float() - low) / (high - low)).clamp(0, 1)
    extrapolation = 1 - ramp  # weight of the unscaled frequencies
    inv_freq = (1.0 / (s.factor * pos_freqs)) * ramp + (1.0 / pos_freqs) * extrapolation
    return inv_freq, float(attention_factor)


def rotary_cos_sin(
    positions: torch.Tensor,
    head_dim: int,
    theta: float,
    dtype: torch.dtype,
    scaling: RopeScaling | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin tables [T, head_dim] for the rotary dims of the tokens at ``positions``."""
    inv_freq, attention_factor = inv_frequencies(head_dim, theta, scaling, positions.device)
    freqs = positions.float()[:, None] * inv_freq[None, :]
    emb = torch.cat([freqs, freqs], dim=-1)
    cos, sin = emb.cos(), emb.sin()
    if attention_factor != 1.0:
        cos, sin = cos * attention_factor, sin * attention_factor
    return cos.to(dtype), sin.to(dtype)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x [T, H, D] (half-split layout) by the per-token angles."""
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos[:, None, :] + rotated * sin[:, None, :]


def apply_rotary_interleaved(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x [T, H, D] whose rotary dims come in pairs ``(x0, x1), (x2, x3), ...``.

    The output is in half-split order (evens' rotation, then odds'), as transformers'
    ``apply_rotary_pos_emb_interleave`` returns it: q and k both get it, so their dot
    product is that of the pairwise rotation.
    """
    half = cos.shape[-1] // 2
    c, s = cos[:, None, :half], sin[:, None, :half]
    x1, x2 = x[..., 0::2], x[..., 1::2]
    return torch.cat([x1 * c - x2 * s, x2 * c + x1 * s], dim=-1)
