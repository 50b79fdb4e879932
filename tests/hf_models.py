"""Tiny random MoE checkpoints built with Hugging Face transformers (the reference)."""

from __future__ import annotations

from pathlib import Path

import torch
import transformers

from elasticmoe import LLM

FAMILIES = ("mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "deepseek_v3", "glm4_moe", "gpt_oss")

BASE = dict(
    vocab_size=256,
    hidden_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    num_experts_per_tok=2,
    max_position_embeddings=512,
    rms_norm_eps=1e-6,
    tie_word_embeddings=False,
    bos_token_id=None,
    eos_token_id=None,
    pad_token_id=0,
    initializer_range=0.05,
)

FAMILY_ARGS: dict[str, dict] = {
    "mixtral": dict(num_local_experts=8, intermediate_size=48),
    # layer 1 is dense (mlp_only_layers) to cover that path; gated shared expert
    "qwen2_moe": dict(
        num_experts=8,
        moe_intermediate_size=32,
        intermediate_size=48,
        shared_expert_intermediate_size=40,
        mlp_only_layers=[1],
        norm_topk_prob=False,
    ),
    "qwen3_moe": dict(
        num_experts=8,
        moe_intermediate_size=32,
        intermediate_size=48,
        norm_topk_prob=True,
    ),
    "olmoe": dict(num_experts=8, intermediate_size=32, norm_topk_prob=False),
    # MLA with a q bottleneck and interleaved YaRN rope (mscale != mscale_all_dim, so both the
    # cos/sin factor and the softmax mscale matter); grouped sigmoid routing over 4 groups of
    # 2 experts, 2 groups allowed, scaled weights; layer 0 dense; one shared expert. The
    # selection bias is set to random values in make_hf_model (transformers zeroes it).
    "deepseek_v3": dict(
        num_key_value_heads=4,
        head_dim=8,  # transformers' rotary dim: must equal qk_rope_head_dim
        n_routed_experts=8,
        n_group=4,
        topk_group=2,
        routed_scaling_factor=2.5,
        n_shared_experts=1,
        moe_intermediate_size=32,
        intermediate_size=48,
        first_k_dense_replace=1,
        q_lora_rank=24,
        kv_lora_rank=16,
        qk_nope_head_dim=8,
        qk_rope_head_dim=8,
        v_head_dim=12,
        norm_topk_prob=True,
        num_mtp_layers=0,
        rope_parameters={
            "rope_type": "yarn",
            "rope_theta": 10000.0,
            "factor": 4.0,
            "original_max_position_embeddings": 128,
            "beta_fast": 32.0,
            "beta_slow": 1.0,
            "mscale": 0.9,
            "mscale_all_dim": 1.0,
        },
    ),
    # layer 0 dense (first_k_dense_replace); sigmoid router picking within the best of 2 groups
    # of 4, scaled weights; ungated shared expert; qkv bias, per-head q/k norm, half the head
    # dims rotated
    "glm4_moe": dict(
        n_routed_experts=8,
        moe_intermediate_size=32,
        intermediate_size=48,
        n_group=2,
        topk_group=1,
        routed_scaling_factor=2.5,
        norm_topk_prob=True,
        n_shared_experts=1,
        first_k_dense_replace=1,
        attention_bias=True,
        use_qk_norm=True,
        partial_rotary_factor=0.5,
    ),
    # layer 0 slides over 8 tokens (shorter than most prompts + outputs), layer 1 is full;
    # YaRN with transformers' truncate=False (gpt-oss's own setting), factor 4 over 128
    "gpt_oss": dict(
        num_local_experts=8,
        intermediate_size=32,
        sliding_window=8,
        layer_types=["sliding_attention", "full_attention"],
        rope_parameters={
            "rope_type": "yarn",
            "rope_theta": 150000.0,
            "factor": 4.0,
            "original_max_position_embeddings": 128,
            "beta_fast": 32.0,
            "beta_slow": 1.0,
            "truncate": False,
        },
    ),
}

# std of the random `e_score_correction_bias` written for families whose router has one:
# transformers initialises it to zeros, which would leave the selection bias untested.
ROUTER_BIAS_STD: dict[str, float] = {"glm4_moe": 0.1}


# transformers initialises some of gpt_oss's biases to zero; a zero bias would let a
# missing bias pass every comparison.
RANDOMISED = {"bias": 0.1, "sinks": 1.0}

def make_hf_model(
    family: str,
    out_dir: Path,
    seed: int = 0,
    router_bias_std: float | None = None,
    **overrides,
) -> transformers.PreTrainedModel:
    """Build a random-weight model with transformers, save it in HF layout, return it.

    ``router_bias_std`` (default: ROUTER_BIAS_STD of the family) draws every
    ``e_score_correction_bias`` from N(0, std^2) before saving.
    """
    torch.manual_seed(seed)
    cls = transformers.CONFIG_MAPPING[family]
    kwargs = {**BASE, **FAMILY_ARGS[family], **overrides}
    if family == "qwen3_moe":
        kwargs["num_local_experts"] = kwargs.pop("num_experts")
    config = cls(**kwargs)
    extra = {"attn_implementation": "eager"} if family == "gpt_oss" else {}
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32, **extra)
    if family == "gpt_oss":
        with torch.no_grad():
            for name, param in model.named_parameters():
                suffix = name.rsplit("_", 1)[-1].rsplit(".", 1)[-1]
                if suffix in RANDOMISED:
                    param.normal_(0.0, RANDOMISED[suffix])
    with torch.no_grad():
        for module in model.modules():
            bias = getattr(module, "e_score_correction_bias", None)
            if bias is not None:  # zero after init: make the selection bias matter
                bias.copy_(torch.randn_like(bias) * 0.05)
    model.eval()
    std = ROUTER_BIAS_STD.get(family, 0.0) if router_bias_std is None else router_bias_std
    if std:
        with torch.no_grad():
            for name, buf in model.named_buffers():
                if name.endswith("e_score_correction_bias"):
                    buf.normal_(0.0, std)
    model.save_pretrained(out_dir)
    return model


PROMPTS = [
    [5, 17, 33, 2, 99, 100, 4],
    [9, 8, 7],
    list(range(10, 50)),
    [200, 201, 202, 203, 204, 205, 206, 207, 208, 209, 210, 211, 212],
]


def capture_logits(llm: LLM) -> dict[str, list[torch.Tensor]]:
    """Record, per request, the logits of every step that samples a token."""
    captured: dict[str, list[torch.Tensor]] = {}
    runner = llm.engine.runner
    original = runner.execute

    def execute(step, load_hook=None):
        logits = original(step, load_hook)
        completing = [s.request for s in step.scheduled if s.completes_sequence]
        for request, row in zip(completing, logits, strict=True):
            captured.setdefault(request.request_id, []).append(row.clone())
        return logits

    runner.execute = execute
    return captured


# --- MXFP4 (gpt-oss's expert format), quantised here the way OpenAI's checkpoints are ----

FP4_GRID = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0])


def quantize_mxfp4(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[..., N] -> blocks [..., N/32, 16] uint8 (FP4 e2m1 codes, two a byte, low nibble
    first) and scales [..., N/32] uint8 (e8m0, bias 127): each group of 32 gets the smallest
    power of two that brings its largest magnitude within 6 (FP4's largest value), and each
    value rounds to the nearest FP4 value."""
    groups = w.float().reshape(*w.shape[:-1], w.shape[-1] // 32, 32)
    amax = groups.abs().amax(-1)
    exp = torch.where(amax > 0, torch.ceil(torch.log2(amax / 6)), torch.full_like(amax, -127))
    exp = exp.clamp(-127, 127)
    scaled = groups / torch.exp2(exp)[..., None]
    nearest = (scaled.abs()[..., None] - FP4_GRID).abs().argmin(-1)
    codes = (nearest + 8 * (scaled < 0)).to(torch.uint8)
    blocks = codes[..., 0::2] | (codes[..., 1::2] << 4)
    return blocks, (exp + 127).to(torch.uint8)


def write_mxfp4_checkpoint(dense_dir: Path, out_dir: Path) -> Path:
    """A copy of a gpt_oss checkpoint whose expert matrices are MXFP4 (``*_blocks`` and
    ``*_scales`` of the [E, out, in] transpose, as gpt-oss ships them); biases, attention
    and router stay float. Returns out_dir."""
    import json
    import shutil

    from safetensors.torch import load_file, save_file

    out_dir.mkdir(parents=True, exist_ok=True)
    for f in dense_dir.iterdir():
        if f.suffix != ".safetensors":
            shutil.copy(f, out_dir / f.name)
    tensors = load_file(str(dense_dir / "model.safetensors"))
    out = {}
    for name, t in tensors.items():
        if name.endswith(("experts.gate_up_proj", "experts.down_proj")):
            blocks, scales = quantize_mxfp4(t.transpose(1, 2).contiguous())
            out[f"{name}_blocks"], out[f"{name}_scales"] = blocks, scales
        else:
            out[name] = t
    save_file(out, str(out_dir / "model.safetensors"), metadata={"format": "pt"})
    cfg = json.loads((dense_dir / "config.json").read_text())
    cfg["quantization_config"] = {
        "quant_method": "mxfp4",
        "modules_to_not_convert": [
            "model.layers.*.self_attn",
            "model.layers.*.mlp.router",
            "model.embed_tokens",
            "lm_head",
        ],
    }
    (out_dir / "config.json").write_text(json.dumps(cfg, indent=2))
    return out_dir
