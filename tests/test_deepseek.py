"""deepseek_v3 (and Kimi K2): MLA without a q bottleneck, the latent KV cache's size, and
config errors. The family's main path (q_lora_rank, YaRN, grouped routing) runs in the
parametrized suites through tests/hf_models.py."""

from __future__ import annotations

import json

import pytest
import torch

from elasticmoe import LLM, SamplingParams
from elasticmoe.model.attention import PagedKVCache
from elasticmoe.model.config import ConfigError, parse_config

from hf_models import PROMPTS, capture_logits, make_hf_model

GREEDY = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)


@pytest.fixture(scope="module")
def plain_q(tmp_path_factory):
    """q_lora_rank null (a plain q_proj), half-split rotary dims and the default RoPE."""
    path = tmp_path_factory.mktemp("deepseek_plain_q")
    hf = make_hf_model(
        "deepseek_v3",
        path,
        seed=1,
        q_lora_rank=None,
        rope_interleave=False,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
    )
    return path, hf


def test_plain_q_proj_matches_transformers(plain_q):
    path, hf = plain_q
    assert "q_proj" in dict(hf.model.layers[0].self_attn.named_children())
    llm = LLM(str(path), num_kv_blocks=64, block_size=4)
    captured = capture_logits(llm)
    outs = llm.generate([{"prompt_token_ids": p} for p in PROMPTS], GREEDY)
    for prompt, out in zip(PROMPTS, outs, strict=True):
        steps = torch.stack(captured[out.request_id])
        full = prompt + out.outputs[0].token_ids
        with torch.no_grad():  # transformers' full forward, no cache
            ref = hf(torch.tensor([full]), use_cache=False).logits[0].float()
        expected = ref[len(prompt) - 1 : len(prompt) - 1 + len(steps)]
        assert (steps - expected).abs().max().item() <= 1e-4


def test_kv_cache_holds_the_latent_and_fits_more_sequences(hf_family_models):
    path, _ = hf_family_models["deepseek_v3"]
    cfg = json.loads((path / "config.json").read_text())
    layers, heads = cfg["num_hidden_layers"], cfg["num_attention_heads"]
    latent = cfg["kv_lora_rank"] + cfg["qk_rope_head_dim"]
    block_size, fp32 = 4, 4
    # room for exactly 40 latent blocks
    memory = 40 * block_size * latent * layers * fp32
    llm = LLM(str(path), block_size=block_size, kv_cache_memory_gb=memory / 2**30)
    cache = llm.engine.kv_cache
    assert cache.bytes_per_token == latent * layers * fp32
    assert cache.layout == (("latent", 1, latent),)
    assert [tuple(t.shape) for t in cache.layers[0]] == [(41, block_size, 1, latent)]
    assert cache.num_blocks == 40
    # the expanded per-head K (nope + rope) and V would fit under a quarter of the blocks
    expanded = PagedKVCache.bytes_per_block(
        layers,
        block_size,
        (
            ("k", heads, cfg["qk_nope_head_dim"] + cfg["qk_rope_head_dim"]),
            ("v", heads, cfg["v_head_dim"]),
        ),
        torch.float32,
    )
    assert memory // expanded < cache.num_blocks / 4
    # the four sequences (25 blocks) run without preemption; the 8 blocks an expanded cache
    # would get in the same memory could not hold even the 40-token prompt's sequence
    outs = llm.generate([{"prompt_token_ids": p} for p in PROMPTS], GREEDY)
    assert all(len(o.outputs[0].token_ids) == GREEDY.max_tokens for o in outs)
    assert llm.engine.scheduler.num_preemptions == 0
    assert (memory // expanded) * block_size < len(PROMPTS[2]) + GREEDY.max_tokens


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"topk_method": "group_limited_greedy"}, "topk_method='group_limited_greedy'"),
        ({"scoring_func": "softmax"}, "scoring_func='softmax'"),
        ({"quantization_config": {"quant_method": "fp8"}}, "quantization_config"),
        ({"kv_lora_rank": 0}, "kv_lora_rank=0"),
        ({"qk_rope_head_dim": 7, "head_dim": 7}, "qk_rope_head_dim=7"),
        ({"first_k_dense_replace": 9}, "first_k_dense_replace=9"),
        ({"rope_parameters": {"rope_type": "longrope", "factor": 2.0}}, "rope_type='longrope'"),
    ],
)
def test_bad_deepseek_config_names_the_field(hf_family_models, change, field):
    path, _ = hf_family_models["deepseek_v3"]
    cfg = json.loads((path / "config.json").read_text())
    config = parse_config(cfg)
    assert config.is_mla and config.moe_layers == (1,) and config.n_shared_experts == 1
    with pytest.raises(ConfigError, match=field.replace("(", r"\(").replace("[", r"\[")):
        parse_config({**cfg, **change})


def test_init_model_preset_serves_like_transformers(tmp_path):
    """`deepseek_v3-tiny` (init-model's preset: YaRN, MLA, grouped routing) on the engine."""
    import transformers

    from elasticmoe.model.init_model import init_model

    path = init_model("deepseek_v3", "tiny", tmp_path / "tiny")
    hf = transformers.AutoModelForCausalLM.from_pretrained(path).eval()
    llm = LLM(str(path), num_kv_blocks=32, block_size=4)
    captured = capture_logits(llm)
    prompt = PROMPTS[3]
    (out,) = llm.generate([{"prompt_token_ids": prompt}], GREEDY)
    with torch.no_grad():
        ref = hf(torch.tensor([prompt + out.outputs[0].token_ids]), use_cache=False).logits[0]
    expected = ref[len(prompt) - 1 : len(prompt) - 1 + GREEDY.max_tokens]
    assert (torch.stack(captured[out.request_id]) - expected).abs().max().item() <= 1e-4


# The fields of moonshotai/Kimi-K2-Instruct's config.json (its fp8 quantization_config left
# out) and what DeepSeek-V3's differs in.
KIMI_K2 = {
    "model_type": "deepseek_v3",
    "vocab_size": 163840,
    "hidden_size": 7168,
    "intermediate_size": 18432,
    "moe_intermediate_size": 2048,
    "num_hidden_layers": 61,
    "num_attention_heads": 64,
    "num_key_value_heads": 64,
    "n_shared_experts": 1,
    "n_routed_experts": 384,
    "routed_scaling_factor": 2.827,
    "kv_lora_rank": 512,
    "q_lora_rank": 1536,
    "qk_rope_head_dim": 64,
    "v_head_dim": 128,
    "qk_nope_head_dim": 128,
    "topk_method": "noaux_tc",
    "n_group": 1,
    "topk_group": 1,
    "num_experts_per_tok": 8,
    "moe_layer_freq": 1,
    "first_k_dense_replace": 1,
    "norm_topk_prob": True,
    "scoring_func": "sigmoid",
    "max_position_embeddings": 131072,
    "rms_norm_eps": 1e-6,
    "rope_theta": 50000.0,
    "rope_scaling": {
        "beta_fast": 1.0,
        "beta_slow": 1.0,
        "factor": 32.0,
        "mscale": 1.0,
        "mscale_all_dim": 1.0,
        "original_max_position_embeddings": 4096,
        "type": "yarn",
    },
    "bos_token_id": 163584,
    "eos_token_id": 163585,
}
DEEPSEEK_V3 = {
    **KIMI_K2,
    "vocab_size": 129280,
    "num_attention_heads": 128,
    "num_key_value_heads": 128,
    "n_routed_experts": 256,
    "routed_scaling_factor": 2.5,
    "n_group": 8,
    "topk_group": 4,
    "first_k_dense_replace": 3,
    "max_position_embeddings": 163840,
    "rope_theta": 10000.0,
    "rope_scaling": {**KIMI_K2["rope_scaling"], "beta_fast": 32, "factor": 40},
    "bos_token_id": 0,
    "eos_token_id": 1,
}


@pytest.mark.parametrize(("cfg", "heads", "dense"), [(KIMI_K2, 64, 1), (DEEPSEEK_V3, 128, 3)])
def test_published_configs_parse_to_a_latent_cache(cfg, heads, dense):
    c = parse_config(cfg)
    assert c.is_mla and c.head_dim == 64 and c.moe_layers == tuple(range(dense, 61))
    assert c.rope_scaling is not None and c.rope_scaling.original_max_position_embeddings == 4096
    # 576 bf16 values per token and layer: 70 KB a token, against 2.5 / 5 MB for the
    # per-head K (192) and V (128) of 64 / 128 heads
    bf16 = torch.bfloat16
    assert PagedKVCache.bytes_per_block(61, 1, c.kv_cache_layout, bf16) == 576 * 61 * 2
    expanded = (("k", heads, 192), ("v", heads, 128))
    assert PagedKVCache.bytes_per_block(61, 1, expanded, bf16) == heads * 320 * 61 * 2


def test_training_a_latent_attention_model_is_refused(hf_family_models, tmp_path):
    from elasticmoe.train.config import parse_train_config
    from elasticmoe.train.trainer import model_config_for

    path, _ = hf_family_models["deepseek_v3"]
    cfg = parse_train_config(
        {"model": {"init_from": str(path)}, "train": {"steps": 100}, "output_dir": str(tmp_path)}
    )
    with pytest.raises(ConfigError, match=r"model_type=.deepseek_v3. cannot be trained"):
        model_config_for(cfg, 256)
