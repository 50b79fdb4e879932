"""Model pieces: gate, golden one-expert test, checkpoint errors, load statistics."""

from __future__ import annotations

import json
import re
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from elasticmoe import LLM, SamplingParams
from elasticmoe.core.experts import LogicalExpert
from elasticmoe.experts.local import LocalExperts
from elasticmoe.experts.weights import ExpertWeights
from elasticmoe.model.checkpoint import CheckpointError, CheckpointReader
from elasticmoe.model.config import ConfigError, load_config, parse_config
from elasticmoe.model.gate import topk_softmax_gate
from elasticmoe.model.init_model import build_config
from elasticmoe.model.model import DenseMLP, SparseMoE

from hf_models import make_hf_model


def test_gate_is_pure_and_counts_tokens():
    logits = torch.tensor([[3.0, 1.0, 2.0, 0.0], [0.0, 0.0, 5.0, 4.0]])
    out = topk_softmax_gate(logits, 2, renormalize=True, out_dtype=torch.float32)
    assert out.indices.tolist() == [[0, 2], [2, 3]]
    assert torch.allclose(out.weights.sum(-1), torch.ones(2))
    assert out.tokens_per_expert.tolist() == [1, 0, 2, 1]
    raw = topk_softmax_gate(logits, 2, renormalize=False, out_dtype=torch.float32)
    assert (raw.weights.sum(-1) < 1).all()
    assert torch.equal(logits, torch.tensor([[3.0, 1.0, 2.0, 0.0], [0.0, 0.0, 5.0, 4.0]]))


def test_one_expert_moe_equals_dense_ffn():
    """Golden test: with one expert (top-1, weight 1) the MoE block is the dense FFN."""
    torch.manual_seed(0)
    cfg = parse_config(build_config("mixtral", "tiny", num_local_experts=1, num_experts_per_tok=1))
    dense = DenseMLP(cfg.hidden_size, cfg.expert_intermediate_size)
    expert = ExpertWeights(
        torch.cat([dense.gate_proj.weight, dense.up_proj.weight]).detach(),
        dense.down_proj.weight.detach(),
    )
    moe = SparseMoE(cfg, layer=0)
    x = torch.randn(7, cfg.hidden_size)
    with torch.no_grad():
        out = moe(x, LocalExperts({LogicalExpert(0, 0): expert}), None)
        assert torch.allclose(out, dense(x), atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("num_tokens", [1, 3, 8, 33, 200, 1100])
@pytest.mark.parametrize("top_k", [1, 2, 4])
def test_fused_experts_match_one_call_per_expert(dtype, num_tokens, top_k):
    """The stacked one-call-per-layer path equals the per-expert loop (to rounding)."""
    torch.manual_seed(num_tokens * 10 + top_k)
    num_experts, hidden, inter = 16, 64, 48
    experts = {
        LogicalExpert(0, e): ExpertWeights(
            (torch.randn(2 * inter, hidden) * 0.1).to(dtype),
            (torch.randn(hidden, inter) * 0.1).to(dtype),
        )
        for e in range(num_experts)
    }
    local = LocalExperts(experts)
    assert set(local.stacked) == {0}
    x = torch.randn(num_tokens, hidden).to(dtype)
    gate = topk_softmax_gate(torch.randn(num_tokens, num_experts), top_k, True, dtype)
    fused = local.forward(0, x, gate)
    loop = local.forward_per_expert(0, x, gate)
    if dtype == torch.bfloat16:
        # oneDNN runs a one-row matmul as a GEMV, whose bf16 rounding may differ from the
        # same row inside a padded bmm: at most one bf16 step (2**-8 relative)
        torch.testing.assert_close(fused, loop, rtol=2**-7, atol=2**-8)
    else:  # BLAS may block an fp32 batched matmul differently from a single one
        torch.testing.assert_close(fused, loop, rtol=1e-5, atol=1e-5)


def test_local_experts_with_a_gap_fall_back_to_the_loop():
    weights = ExpertWeights(torch.randn(8, 4), torch.randn(4, 4))
    local = LocalExperts({LogicalExpert(0, 0): weights, LogicalExpert(0, 2): weights})
    assert not local.stacked
    gate = topk_softmax_gate(torch.tensor([[1.0, -9.0, 2.0]]), 2, True, torch.float32)
    x = torch.randn(1, 4)
    torch.testing.assert_close(local.forward(0, x, gate), local.forward_per_expert(0, x, gate))


@pytest.fixture
def ckpt(tmp_path):
    make_hf_model("mixtral", tmp_path / "m")
    return tmp_path / "m"


def test_unknown_model_type(ckpt):
    cfg = json.loads((ckpt / "config.json").read_text())
    cfg["model_type"] = "llama"
    (ckpt / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ConfigError, match=r"config.json: model_type='llama' is not supported"):
        load_config(ckpt)


def test_missing_config_field(ckpt):
    cfg = json.loads((ckpt / "config.json").read_text())
    del cfg["hidden_size"]
    (ckpt / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ConfigError, match="'hidden_size' is missing"):
        LLM(str(ckpt))


@pytest.mark.parametrize(
    "field, value, words",
    [
        ("hidden_size", 0, "hidden_size=0 must be in 1.."),
        ("num_attention_heads", 0, "num_attention_heads=0 must be >= 1"),
        ("num_hidden_layers", -2, "num_hidden_layers=-2"),
        ("vocab_size", 1 << 30, "vocab_size="),
        ("rms_norm_eps", float("nan"), "rms_norm_eps=nan must be a finite number"),
        ("max_position_embeddings", 0, "max_position_embeddings=0"),
        ("eos_token_id", 10**9, "eos_token_id=[1000000000] is outside the vocabulary"),
    ],
)
def test_config_numbers_are_range_checked(ckpt, field, value, words):
    cfg = json.loads((ckpt / "config.json").read_text())
    cfg[field] = value
    (ckpt / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ConfigError, match=re.escape(words)):
        load_config(ckpt)


@pytest.mark.parametrize("fname", ["../outside.safetensors", "/etc/passwd", "sub/x.safetensors"])
def test_index_files_stay_in_the_checkpoint(ckpt, fname):
    (ckpt / "model.safetensors.index.json").write_text(
        json.dumps({"weight_map": {"model.embed_tokens.weight": fname}})
    )
    with pytest.raises(CheckpointError, match=r"is not a \.safetensors file in"):
        CheckpointReader(ckpt)


def test_missing_tensor_is_named(ckpt):
    path = ckpt / "model.safetensors"
    tensors = load_file(path)
    del tensors["model.layers.1.block_sparse_moe.experts.3.w2.weight"]
    save_file(tensors, path)
    with pytest.raises(
        CheckpointError, match=r"'model.layers.1.block_sparse_moe.experts.3.w2.weight' is missing"
    ):
        LLM(str(ckpt))


def test_shape_mismatch_names_file_and_tensor(ckpt):
    path = ckpt / "model.safetensors"
    tensors = load_file(path)
    tensors["model.layers.0.self_attn.q_proj.weight"] = torch.zeros(3, 3)
    save_file(tensors, path)
    with pytest.raises(
        CheckpointError,
        match=r"model\.safetensors: tensor 'model\.layers\.0\.self_attn\.q_proj\.weight' "
        r"has shape \(3, 3\)",
    ):
        LLM(str(ckpt))


def test_corrupt_file_is_named(ckpt):
    (ckpt / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00garbage!")
    with pytest.raises(CheckpointError, match=r"model\.safetensors: cannot read"):
        LLM(str(ckpt))


def test_sharded_checkpoint_with_index(tmp_path, ckpt):
    """Many files plus an index load the same as one file."""
    from elasticmoe.model.init_model import init_model

    one = init_model("qwen2_moe", "tiny", tmp_path / "one")
    many = init_model("qwen2_moe", "tiny", tmp_path / "many", max_shard_size_mb=0.05)
    assert len(list(many.glob("*.safetensors"))) > 1
    params = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)
    a = LLM(str(one)).generate({"prompt_token_ids": [1, 2, 3]}, params)
    b = LLM(str(many)).generate({"prompt_token_ids": [1, 2, 3]}, params)
    assert a[0].outputs[0].token_ids == b[0].outputs[0].token_ids
    # an index pointing at a missing shard is reported by name
    shard = sorted(many.glob("model-*.safetensors"))[-1]
    shutil.move(shard, tmp_path / "elsewhere")
    with pytest.raises(CheckpointError, match=shard.name):
        LLM(str(many))


def test_expert_load_statistics_add_up(ckpt):
    llm = LLM(str(ckpt), num_kv_blocks=64)
    prompts = [{"prompt_token_ids": list(range(3, 3 + n))} for n in (5, 9, 2)]
    llm.generate(prompts, SamplingParams(max_tokens=4, temperature=0, ignore_eos=True))
    rec = llm.engine.load_recorder
    cfg = llm.engine.model_config
    # every computed token is routed to top_k experts in every MoE layer
    num_tokens = (5 + 9 + 2) + 3 * 3  # prompts + decode steps (last sampled token never computed)
    assert rec.total.shape == (len(cfg.moe_layers), cfg.num_experts)
    assert (rec.total.sum(axis=1) == num_tokens * cfg.top_k).all()
    assert sum(s.counts.sum() for s in rec.samples) == num_tokens * cfg.top_k * len(cfg.moe_layers)
    assert rec.window(3600).sum() == rec.total.sum()


def test_decode_buckets_pad_without_changing_tokens_or_load(ckpt):
    """Decode steps padded to bucket sizes (for CUDA graphs) give the same tokens and the
    same expert load counts as unpadded ones; the dummy rows write only the scratch block."""
    prompts = [{"prompt_token_ids": [i + 3, i + 9, i + 11]} for i in range(5)]
    params = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)
    plain = LLM(str(ckpt), dtype="float32", num_kv_blocks=64, block_size=4)
    padded = LLM(str(ckpt), dtype="float32", num_kv_blocks=64, block_size=4, decode_buckets=[2, 8])
    want = [o.outputs[0].token_ids for o in plain.generate(prompts, params)]
    got = [o.outputs[0].token_ids for o in padded.generate(prompts, params)]
    assert got == want
    assert (plain.engine.load_recorder.total == padded.engine.load_recorder.total).all()
    assert padded.engine.runner._bucket(5) == 8 and padded.engine.runner._bucket(9) is None
