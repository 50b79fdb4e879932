"""The deepseek_v3/glm4_moe router (sigmoid, selection bias, group-limited top-k) against
transformers' own router and MoE block on random inputs; glm4_moe's config switches, field
errors and checkpoint bias. (Its end-to-end comparisons run in test_engine_vs_hf.py and
test_distributed.py through hf_models.FAMILIES.)"""

from __future__ import annotations

import dataclasses

import pytest
import torch
import transformers
from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3TopkRouter
from transformers.models.glm4_moe.modeling_glm4_moe import Glm4MoeTopkRouter

from elasticmoe import LLM, SamplingParams
from elasticmoe.core.experts import LogicalExpert
from elasticmoe.experts.local import LocalExperts
from elasticmoe.experts.weights import ExpertWeights
from elasticmoe.model.config import ConfigError, parse_config
from elasticmoe.model.gate import grouped_topk_sigmoid_gate
from elasticmoe.model.init_model import build_config
from elasticmoe.model.model import SparseMoE

from hf_models import BASE, FAMILY_ARGS, PROMPTS, capture_logits

HIDDEN, EXPERTS = 32, 16


def _sorted(weights: torch.Tensor, indices: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Slot order is unspecified (topk sorted=False): compare per row by expert id."""
    order = indices.argsort(dim=-1)
    return weights.gather(1, order), indices.gather(1, order)


@pytest.mark.parametrize(
    ("router_cls", "config_cls"),
    [
        (Glm4MoeTopkRouter, transformers.Glm4MoeConfig),
        (DeepseekV3TopkRouter, transformers.DeepseekV3Config),
    ],
)
@pytest.mark.parametrize("norm_topk_prob", [True, False])
def test_matches_transformers_router(router_cls, config_cls, norm_topk_prob):
    torch.manual_seed(1)
    config = config_cls(
        hidden_size=HIDDEN,
        n_routed_experts=EXPERTS,
        num_experts_per_tok=4,
        n_group=4,
        topk_group=2,
        norm_topk_prob=norm_topk_prob,
        routed_scaling_factor=2.5,
    )
    router = router_cls(config)
    with torch.no_grad():
        router.weight.normal_(0, 0.5)
        router.e_score_correction_bias.uniform_(-0.3, 0.3)
    x = torch.randn(64, HIDDEN)
    with torch.no_grad():
        logits, ref_weights, ref_indices = router(x)
    out = grouped_topk_sigmoid_gate(
        logits, router.e_score_correction_bias, 4, 4, 2, norm_topk_prob, 2.5, torch.float32
    )
    weights, indices = _sorted(out.weights, out.indices)
    ref_weights, ref_indices = _sorted(ref_weights, ref_indices)
    assert torch.equal(indices, ref_indices)
    torch.testing.assert_close(weights, ref_weights, rtol=1e-6, atol=1e-7)
    assert (
        out.tokens_per_expert.tolist()
        == torch.bincount(ref_indices.flatten(), minlength=EXPERTS).tolist()
    )
    # the bias decides the selection on these inputs (it is not a no-op) ...
    unbiased = grouped_topk_sigmoid_gate(
        logits, torch.zeros(EXPERTS), 4, 4, 2, norm_topk_prob, 2.5, torch.float32
    )
    changed = (_sorted(unbiased.weights, unbiased.indices)[1] != indices).any(dim=-1)
    assert changed.sum() >= 8, "the correction bias should change many tokens' experts"
    # ... while the weights stay the unbiased sigmoid scores of the chosen experts
    scores = torch.sigmoid(logits).gather(1, indices)
    if norm_topk_prob:
        scores = scores / scores.sum(-1, keepdim=True)
    torch.testing.assert_close(weights, scores * 2.5)
    # the experts come from at most topk_group groups
    for row in indices // (EXPERTS // 4):
        assert row.unique().numel() <= 2


def test_output_dtype_and_purity():
    logits = torch.randn(5, 8)
    bias = torch.full((8,), 0.1)
    before = logits.clone()
    out = grouped_topk_sigmoid_gate(logits, bias, 2, 2, 1, True, 1.0, torch.bfloat16)
    assert out.weights.dtype == torch.bfloat16
    assert out.indices.shape == (5, 2)
    assert torch.equal(logits, before)
    torch.testing.assert_close(out.weights.float().sum(-1), torch.ones(5), atol=1e-2, rtol=0)


def test_moe_block_with_shared_experts_matches_transformers():
    """SparseMoE (sigmoid router + ungated shared experts) equals transformers' MoE block."""
    from transformers.models.glm4_moe.modeling_glm4_moe import Glm4MoeMoE

    torch.manual_seed(2)
    hf_config = transformers.Glm4MoeConfig(
        hidden_size=HIDDEN,
        n_routed_experts=EXPERTS,
        moe_intermediate_size=24,
        num_experts_per_tok=4,
        n_group=4,
        topk_group=2,
        n_shared_experts=2,
        routed_scaling_factor=1.7,
    )
    hf = Glm4MoeMoE(hf_config).eval()
    with torch.no_grad():
        for p in hf.parameters():
            p.normal_(0, 0.2)
        hf.gate.e_score_correction_bias.uniform_(-0.3, 0.3)
    base = parse_config(build_config("qwen3_moe", "tiny", hidden_size=HIDDEN))
    config = dataclasses.replace(
        base,
        num_experts=EXPERTS,
        top_k=4,
        expert_intermediate_size=24,
        scoring_func="sigmoid",
        n_group=4,
        topk_group=2,
        n_shared_experts=2,
        routed_scaling_factor=1.7,
        norm_topk_prob=True,
    )
    moe = SparseMoE(config, layer=0)
    state = {k: v for k, v in hf.state_dict().items() if not k.startswith("experts.")}
    moe.load_state_dict(state, strict=True)
    experts = LocalExperts(
        {
            LogicalExpert(0, e): ExpertWeights(
                hf.experts.gate_up_proj[e].detach(), hf.experts.down_proj[e].detach()
            )
            for e in range(EXPERTS)
        }
    )
    x = torch.randn(1, 40, HIDDEN)
    with torch.no_grad():
        torch.testing.assert_close(moe(x[0], experts, None), hf(x)[0], rtol=1e-5, atol=1e-6)


GLM_FIELD_ERRORS = [
    ({"n_group": 3}, r"n_group=3 must divide the number of routed experts \(8\)"),
    ({"topk_group": 3}, r"topk_group=3 must be in 1..n_group=2"),
    ({"n_group": 0}, r"n_group=0 must be in 1..4096"),
    ({"routed_scaling_factor": 0}, r"routed_scaling_factor=0.0 must be a finite number > 0"),
    ({"routed_scaling_factor": "2.5"}, r"routed_scaling_factor='2.5' must be a number"),
    ({"n_shared_experts": -1}, r"n_shared_experts=-1 must be in 0..64"),
    ({"first_k_dense_replace": 5}, r"first_k_dense_replace=5 must be in 0..2"),
    ({"use_qk_norm": "yes"}, r"use_qk_norm='yes' must be true or false"),
    ({"num_experts_per_tok": 5}, r"num_experts_per_tok=5 exceeds the experts of the topk_group"),
    ({"partial_rotary_factor": 1.5}, r"partial_rotary_factor=1.5 must be in \(0, 1\]"),
    ({"partial_rotary_factor": 0.1875}, r"partial_rotary_factor=0.1875 gives 3 rotary dims"),
    ({"rope_parameters": {"rope_type": "longrope", "factor": 4.0}}, r"rope_type='longrope'"),
    ({"hidden_act": "gelu"}, r"hidden_act='gelu' is not supported"),
]


@pytest.fixture(scope="module")
def glm_config() -> dict:
    """A transformers-written glm4_moe config.json (as tests/hf_models.py builds it)."""
    return transformers.Glm4MoeConfig(**BASE, **FAMILY_ARGS["glm4_moe"]).to_dict()


def test_glm4_moe_config_resolves_the_switches(glm_config):
    c = parse_config(glm_config)
    assert c.moe_layers == (1,) and c.intermediate_size == 48
    assert (c.num_experts, c.expert_intermediate_size, c.n_shared_experts) == (8, 32, 1)
    assert (c.scoring_func, c.n_group, c.topk_group) == ("sigmoid", 2, 1)
    assert c.routed_scaling_factor == 2.5 and c.norm_topk_prob
    assert c.qkv_bias and c.qk_norm == "per_head"
    assert c.rotary_dim == 8 and c.head_dim == 16
    # older checkpoints keep partial_rotary_factor at the top level; glm4_moe defaults to 0.5
    old = {**glm_config, "rope_parameters": None, "rope_theta": 1e6}
    assert parse_config({**old, "partial_rotary_factor": 0.25}).rotary_dim == 4
    assert parse_config(old).rotary_dim == 8


@pytest.mark.parametrize(("change", "message"), GLM_FIELD_ERRORS)
def test_glm4_moe_bad_fields_are_named(glm_config, change, message):
    cfg = {**glm_config, **change}
    if "partial_rotary_factor" in change:
        cfg["rope_parameters"] = {**glm_config["rope_parameters"], **change}
    with pytest.raises(ConfigError, match=message):
        parse_config(cfg)


def test_checkpoint_bias_is_fp32_and_changes_the_selection(hf_family_models):
    """The engine loads glm4_moe's random e_score_correction_bias (kept fp32 in a bf16 model),
    and on the model's own hidden states that bias changes which experts are chosen."""
    path, hf = hf_family_models["glm4_moe"]
    llm = LLM(str(path), dtype="bfloat16", num_kv_blocks=16)
    moe = llm.engine.model.model.layers[1].mlp
    bias = moe.gate.e_score_correction_bias
    assert bias.dtype == torch.float32 and moe.gate.weight.dtype == torch.float32
    assert torch.equal(bias, hf.model.layers[1].mlp.gate.e_score_correction_bias)
    assert bias.abs().min() > 0
    with torch.no_grad():
        hidden = hf(torch.tensor([list(range(10, 74))]), output_hidden_states=True)
        x = hf.model.layers[1].post_attention_layernorm(hidden.hidden_states[1][0])
    c = moe.config
    logits = x.float() @ hf.model.layers[1].mlp.gate.weight.float().T
    args = (c.top_k, c.n_group, c.topk_group, True, c.routed_scaling_factor, torch.float32)
    with_bias = grouped_topk_sigmoid_gate(logits, bias, *args)
    without = grouped_topk_sigmoid_gate(logits, torch.zeros_like(bias), *args)
    changed = (with_bias.indices.sort(-1)[0] != without.indices.sort(-1)[0]).any(-1)
    assert changed.sum() >= 4, f"only {changed.sum()} of 64 tokens change experts"
    # and the bf16 engine stays close to transformers' fp32 forward
    captured = capture_logits(llm)
    llm.generate([{"prompt_token_ids": PROMPTS[2]}], SamplingParams(max_tokens=1, temperature=0))
    ours = next(iter(captured.values()))[0]
    with torch.no_grad():
        ref = hf(torch.tensor([PROMPTS[2]])).logits[0, -1]
    assert torch.nn.functional.cosine_similarity(ours, ref, dim=0) > 0.99


def test_training_a_glm4_moe_checkpoint_is_refused(hf_family_models):
    """elasticmoe train's model has no sigmoid router / partial rotary: it says so up front."""
    from elasticmoe.train.config import TrainConfig
    from elasticmoe.train.trainer import model_config_for

    path, _ = hf_family_models["glm4_moe"]
    config = TrainConfig.model_validate(
        {"model": {"init_from": str(path)}, "train": {"steps": 100}, "output_dir": "unused"}
    )
    with pytest.raises(ConfigError, match=r"model.init_from: model_type='glm4_moe' cannot be"):
        model_config_for(config, 256)
