"""gpt_oss specifics: sinks and sliding windows matter, MXFP4 experts, config errors.

The parametrized engine-vs-transformers and distributed tests cover gpt_oss through
``hf_models.FAMILIES``; this module checks what those cannot show: that the features are
not no-ops, that an MXFP4 checkpoint loads (locally and on an expert worker) exactly as
transformers dequantises it, and that a peer copy carries the biases.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from test_expert_service import LoopThread, Server

from elasticmoe import LLM, SamplingParams
from elasticmoe.core.experts import LogicalExpert
from elasticmoe.experts.local import LocalExperts
from elasticmoe.experts.service import ExpertStore
from elasticmoe.experts.weights import expert_tensor_shapes, load_expert_weights
from elasticmoe.model import checkpoint
from elasticmoe.model.checkpoint import CheckpointReader, dequantize_mxfp4
from elasticmoe.model.config import ConfigError, load_config, parse_config
from elasticmoe.model.gate import topk_logits_softmax_gate

from hf_models import PROMPTS, capture_logits, quantize_mxfp4, write_mxfp4_checkpoint

transformers = pytest.importorskip("transformers")

GREEDY = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)
LONG = PROMPTS[2]  # 40 tokens: five times the 8-token window of layer 0


def engine_logits(path: Path, prompt: list[int]) -> tuple[torch.Tensor, list[int]]:
    """Prefill + decode logits of one greedy request, and the tokens (prompt + output)."""
    llm = LLM(str(path), num_kv_blocks=64, block_size=4)
    captured = capture_logits(llm)
    out = llm.generate([{"prompt_token_ids": prompt}], GREEDY)[0]
    return torch.stack(captured[out.request_id]), prompt + out.outputs[0].token_ids


def hf_logits(hf, tokens: list[int], num_prompt: int, num_steps: int) -> torch.Tensor:
    """transformers' uncached full forward, rows that predict each generated token."""
    with torch.no_grad():
        ref = hf(torch.tensor([tokens])).logits[0].float()
    return ref[num_prompt - 1 : num_prompt - 1 + num_steps]


def test_sinks_and_sliding_window_change_the_result(hf_family_models):
    path, hf = hf_family_models["gpt_oss"]
    ours, tokens = engine_logits(path, LONG)
    ref = hf_logits(hf, tokens, len(LONG), len(ours))
    assert (ours - ref).abs().max().item() <= 1e-4

    # transformers without the window (every layer full attention) ...
    saved_types = list(hf.config.layer_types)
    hf.config.layer_types = ["full_attention"] * len(saved_types)
    try:
        no_window = hf_logits(hf, tokens, len(LONG), len(ours))
    finally:
        hf.config.layer_types = saved_types
    # ... and without sinks (a -inf sink takes no probability mass)
    sinks = [layer.self_attn.sinks for layer in hf.model.layers]
    saved_sinks = [s.detach().clone() for s in sinks]
    with torch.no_grad():
        for s in sinks:
            s.fill_(float("-inf"))
    try:
        no_sinks = hf_logits(hf, tokens, len(LONG), len(ours))
    finally:
        with torch.no_grad():
            for s, saved in zip(sinks, saved_sinks, strict=True):
                s.copy_(saved)
    assert (hf_logits(hf, tokens, len(LONG), len(ours)) - ref).abs().max().item() == 0
    assert (no_window - ref).abs().max().item() > 1e-2
    assert (no_sinks - ref).abs().max().item() > 1e-2


def test_router_softmax_over_the_top_k_logits():
    logits = torch.tensor([[1.0, 3.0, 2.0, -1.0]])
    gate = topk_logits_softmax_gate(logits, 2, torch.float32)
    assert gate.indices.tolist() == [[1, 2]]
    expected = torch.softmax(torch.tensor([3.0, 2.0]), dim=0)
    torch.testing.assert_close(gate.weights[0], expected)
    assert gate.tokens_per_expert.tolist() == [0, 1, 1, 0]


def test_expert_biases_and_activation_from_the_checkpoint(hf_family_models):
    """One expert of ours against transformers' GptOssExperts on the same rows."""
    path, hf = hf_family_models["gpt_oss"]
    config = load_config(path)
    w = load_expert_weights(CheckpointReader(path), config, LogicalExpert(1, 3), torch.float32)
    assert w.activation.name == "clamped_swiglu" and w.activation.limit == 7.0
    assert set(w.tensors()) == set(expert_tensor_shapes(config))
    experts = hf.model.layers[1].mlp.experts
    x = torch.randn(5, config.hidden_size) * 12  # big enough to reach the clamp
    with torch.no_grad():
        gate_up = x @ experts.gate_up_proj[3] + experts.gate_up_proj_bias[3]
        assert gate_up.abs().max() > experts.limit
        want = experts._apply_gate(gate_up) @ experts.down_proj[3] + experts.down_proj_bias[3]
    torch.testing.assert_close(w.forward(x), want, atol=1e-5, rtol=1e-5)


# --- MXFP4 -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def mxfp4(hf_family_models, tmp_path_factory) -> tuple[Path, object]:
    """(MXFP4 checkpoint, transformers' model loaded from it, dequantised on CPU)."""
    dense, _ = hf_family_models["gpt_oss"]
    path = write_mxfp4_checkpoint(dense, tmp_path_factory.mktemp("gpt_oss_mxfp4"))
    hf = transformers.AutoModelForCausalLM.from_pretrained(
        path,
        quantization_config=transformers.Mxfp4Config(dequantize=True),
        attn_implementation="eager",
        dtype=torch.float32,
    )
    hf.eval()
    return path, hf


def test_dequantize_matches_transformers_and_the_fp4_grid():
    from transformers.integrations.mxfp4 import convert_moe_packed_tensors

    torch.manual_seed(0)
    w = torch.randn(3, 64, 96) * torch.logspace(-3, 1, 96)  # [E, out, in], varied scales
    blocks, scales = quantize_mxfp4(w)
    assert blocks.shape == (3, 64, 3, 16) and scales.shape == (3, 64, 3)
    ours = dequantize_mxfp4(blocks, scales)
    theirs = convert_moe_packed_tensors(blocks, scales, dtype=torch.float32)  # [E, in, out]
    assert torch.equal(ours, theirs.transpose(1, 2))
    # every value is a grid value times its group's power of two, within half a step
    step = torch.exp2(scales.to(torch.int32) - 127).float().repeat_interleave(32, dim=-1)
    assert ((ours - w).abs() <= step + 1e-12).all()
    with pytest.raises(ValueError, match="uint8"):
        dequantize_mxfp4(blocks.to(torch.int16), scales)


def test_mxfp4_checkpoint_matches_transformers(mxfp4):
    path, hf = mxfp4
    reader = CheckpointReader(path)
    assert not reader.has("model.layers.0.mlp.experts.gate_up_proj")
    assert reader.has("model.layers.0.mlp.experts.gate_up_proj_blocks")
    ours, tokens = engine_logits(path, LONG)
    ref = hf_logits(hf, tokens, len(LONG), len(ours))
    assert (ours - ref).abs().max().item() <= 1e-4


def test_a_worker_dequantises_only_its_experts(mxfp4, monkeypatch):
    path, hf = mxfp4
    seen: list[tuple[int, ...]] = []
    real = checkpoint.dequantize_mxfp4

    def spy(blocks: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        seen.append(tuple(blocks.shape))
        return real(blocks, scales, dtype)

    monkeypatch.setattr(checkpoint, "dequantize_mxfp4", spy)
    config = load_config(path)
    store = ExpertStore(path, num_slots=2, config=config)
    replica, _ = store.load_from_checkpoint(LogicalExpert(0, 5))
    inter, hidden = config.expert_intermediate_size, config.hidden_size
    # one expert's slices (gate_up [2I, H/32, 16], down [H, I/32, 16]), never the stack
    assert seen == [(2 * inter, hidden // 32, 16), (hidden, inter // 32, 16)]
    x = torch.randn(4, hidden)
    experts = hf.model.layers[0].mlp.experts
    with torch.no_grad():
        gate_up = x @ experts.gate_up_proj[5] + experts.gate_up_proj_bias[5]
        want = experts._apply_gate(gate_up) @ experts.down_proj[5] + experts.down_proj_bias[5]
    torch.testing.assert_close(store.forward([replica.weights], [4], x), want)


@pytest.fixture
def servers(hf_family_models) -> Iterator[tuple[Server, Server]]:
    path, _ = hf_family_models["gpt_oss"]
    loop = LoopThread()
    started = [Server(loop, ExpertStore(path, 2, worker_id=w)) for w in ("a", "b")]
    yield started[0], started[1]
    for s in started:
        s.stop()
    loop.close()


def test_peer_copy_carries_biases_and_the_activation(servers, hf_family_models):
    a, b = servers
    a.load((1, 2))
    info = b.load((1, 2), peer=a).experts[0]
    sent, got = a.store.get(LogicalExpert(1, 2)), b.store.get(LogicalExpert(1, 2))
    assert info.checksum == sent.checksum == got.checksum
    assert set(got.weights.tensors()) == {"gate_up", "down", "gate_up_bias", "down_bias"}
    for name, tensor in sent.weights.tensors().items():
        assert torch.equal(tensor, got.weights.tensors()[name]), name
    assert got.weights.activation == b.store.config.expert_activation
    x = torch.randn(3, a.store.hidden_size) * 4
    assert torch.equal(a.forward(1, [(2, 3)], x), b.forward(1, [(2, 3)], x))


# --- config ----------------------------------------------------------------------------


def gpt_oss_config(path: Path, **changes) -> dict:
    cfg = json.loads((path / "config.json").read_text())
    cfg.update(changes)
    return cfg


@pytest.mark.parametrize(
    ("changes", "field"),
    [
        ({"layer_types": ["sliding_attention", "chunked_attention"]}, "layer_types"),
        ({"layer_types": ["full_attention"]}, "layer_types"),
        ({"sliding_window": 0}, "sliding_window"),
        ({"sliding_window": None}, "sliding_window"),
        ({"swiglu_limit": -1.0}, "swiglu_limit"),
        ({"swiglu_alpha": "fast"}, "swiglu_alpha"),
        ({"quantization_config": {"quant_method": "fp8"}}, "quantization_config.quant_method"),
    ],
)
def test_bad_config_names_the_field(hf_family_models, changes, field):
    path, _ = hf_family_models["gpt_oss"]
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        parse_config(gpt_oss_config(path, **changes))


def test_config_reads_gpt_oss(hf_family_models):
    path, _ = hf_family_models["gpt_oss"]
    c = load_config(path)
    assert [c.layer_sliding_window(i) for i in range(c.num_layers)] == [8, None]
    assert c.attention_sinks and c.o_bias and c.qkv_bias and c.router_bias and c.expert_bias
    assert c.rope_scaling is not None and c.rope_scaling.rope_type == "yarn"
    assert not c.rope_scaling.truncate
    # a full-attention-only model needs no window
    cfg = gpt_oss_config(path, layer_types=["full_attention"] * 2, sliding_window=None)
    full = parse_config(cfg)
    assert full.layer_sliding_window(0) is None


@pytest.mark.parametrize("num_tokens", [1, 16, 1100])  # grouped_mm, padded bmm, grouped_mm
def test_local_experts_stack_biases(hf_family_models, num_tokens):
    path, _ = hf_family_models["gpt_oss"]
    config = load_config(path)
    local = LocalExperts.from_checkpoint(CheckpointReader(path), config, torch.float32, "cpu")
    _, _, b13, b2, activation, _ = local.stacked[0]
    assert b13.shape == (config.num_experts, 2 * config.expert_intermediate_size)
    assert b2.shape == (config.num_experts, config.hidden_size)
    assert activation.name == "clamped_swiglu"
    # fused path == one call per expert, on rows routed to every expert
    x = torch.randn(num_tokens, config.hidden_size) * 3
    logits = torch.randn(num_tokens, config.num_experts)
    gate = topk_logits_softmax_gate(logits, 2, torch.float32)
    torch.testing.assert_close(local.forward(0, x, gate), local.forward_per_expert(0, x, gate))


def test_init_model_preset_serves_like_transformers(tmp_path):
    """`init-model gpt_oss tiny` writes a checkpoint elasticmoe and transformers agree on."""
    from elasticmoe.model.init_model import init_model

    path = init_model("gpt_oss", "tiny", tmp_path / "gpt_oss-tiny")
    hf = transformers.AutoModelForCausalLM.from_pretrained(
        path, attn_implementation="eager", dtype=torch.float32
    )
    hf.eval()
    ours, tokens = engine_logits(path, LONG)
    assert (ours - hf_logits(hf, tokens, len(LONG), len(ours))).abs().max().item() <= 1e-4


def test_parses_a_gpt_oss_20b_style_config():
    """The shape of openai/gpt-oss-20b's config.json (rope_scaling and rope_theta at the top
    level, MXFP4 quantization_config)."""
    cfg = {
        "architectures": ["GptOssForCausalLM"],
        "model_type": "gpt_oss",
        "attention_bias": True,
        "head_dim": 64,
        "hidden_act": "silu",
        "hidden_size": 2880,
        "intermediate_size": 2880,
        "layer_types": ["sliding_attention", "full_attention"] * 12,
        "max_position_embeddings": 131072,
        "num_attention_heads": 64,
        "num_experts_per_tok": 4,
        "num_hidden_layers": 24,
        "num_key_value_heads": 8,
        "num_local_experts": 32,
        "rms_norm_eps": 1e-05,
        "rope_scaling": {
            "beta_fast": 32.0,
            "beta_slow": 1.0,
            "factor": 32.0,
            "original_max_position_embeddings": 4096,
            "rope_type": "yarn",
            "truncate": False,
        },
        "rope_theta": 150000,
        "sliding_window": 128,
        "swiglu_limit": 7.0,
        "tie_word_embeddings": False,
        "vocab_size": 201088,
        "eos_token_id": 200002,
        "pad_token_id": 199999,
        "quantization_config": {
            "modules_to_not_convert": ["model.layers.*.self_attn", "model.embed_tokens"],
            "quant_method": "mxfp4",
        },
    }
    c = parse_config(cfg)
    assert c.rope_theta == 150000 and c.rope_scaling.factor == 32.0
    assert c.layer_sliding_window(0) == 128 and c.layer_sliding_window(23) is None
    assert c.expert_activation.alpha == 1.702 and c.top_k == 4 and c.num_experts == 32
    assert c.moe_layers == tuple(range(24))
