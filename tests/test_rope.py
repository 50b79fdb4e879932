"""RoPE tables against transformers' own: default and YaRN (deepseek's and gpt-oss's)."""

from __future__ import annotations

import pytest
import torch
from transformers import PretrainedConfig
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

from elasticmoe.model.config import ConfigError, parse_config
from elasticmoe.model.rope import apply_rotary, apply_rotary_interleaved, inv_frequencies

BASE = {
    "model_type": "mixtral",
    "vocab_size": 64,
    "hidden_size": 64,
    "intermediate_size": 32,
    "num_hidden_layers": 1,
    "num_attention_heads": 2,
    "num_local_experts": 4,
    "num_experts_per_tok": 2,
    "max_position_embeddings": 4096,
}
YARN_CASES = [
    # deepseek-v3 / kimi-k2: mscale == mscale_all_dim, so cos/sin are not scaled
    {
        "rope_type": "yarn",
        "factor": 40.0,
        "original_max_position_embeddings": 4096,
        "beta_fast": 32,
        "beta_slow": 1,
        "mscale": 1.0,
        "mscale_all_dim": 1.0,
    },
    # gpt-oss: no mscale (attention factor 0.1 ln(factor) + 1), untruncated correction range
    {
        "rope_type": "yarn",
        "factor": 32.0,
        "original_max_position_embeddings": 256,
        "beta_fast": 32.0,
        "beta_slow": 1.0,
        "truncate": False,
    },
    # an explicit attention factor
    {
        "rope_type": "yarn",
        "factor": 4.0,
        "original_max_position_embeddings": 1024,
        "attention_factor": 1.3,
    },
]


@pytest.mark.parametrize("params", YARN_CASES)
def test_yarn_matches_transformers(params: dict) -> None:
    cfg = {**BASE, "rope_parameters": {**params, "rope_theta": 50000.0}}
    ours = parse_config(cfg)
    assert ours.rope_scaling is not None
    hf = PretrainedConfig(**{k: v for k, v in cfg.items() if k != "model_type"})
    hf.head_dim = 32
    hf.rope_parameters = {**params, "rope_theta": 50000.0}
    want, want_factor = ROPE_INIT_FUNCTIONS["yarn"](hf)
    got, factor = inv_frequencies(32, ours.rope_theta, ours.rope_scaling)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=0)
    assert factor == pytest.approx(want_factor)


def test_unknown_rope_type_names_field() -> None:
    with pytest.raises(ConfigError, match="rope_type='dynamic'"):
        parse_config({**BASE, "rope_parameters": {"rope_type": "dynamic", "factor": 2.0}})
    with pytest.raises(ConfigError, match="rope_parameters.factor"):
        parse_config({**BASE, "rope_parameters": {"rope_type": "yarn", "factor": -1.0}})


def test_interleaved_is_half_split_of_deinterleaved() -> None:
    """Pairwise rotation == the half-split rotation of the de-interleaved vector."""
    x = torch.randn(3, 2, 8)
    angle = torch.randn(3, 4)
    cos, sin = torch.cat([angle, angle], -1).cos(), torch.cat([angle, angle], -1).sin()
    deinterleaved = torch.cat([x[..., 0::2], x[..., 1::2]], dim=-1)
    torch.testing.assert_close(
        apply_rotary_interleaved(x, cos, sin), apply_rotary(deinterleaved, cos, sin)
    )
