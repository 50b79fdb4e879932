"""Write small random-weight MoE checkpoints in the Hugging Face layout.

Tests, benchmarks and demos need real-looking model directories (config.json, tokenizer,
safetensors weights) for each supported family without downloading anything. The files written
here load with ``transformers.AutoModelForCausalLM.from_pretrained`` with no missing or
unexpected keys, and use the per-expert tensor names that ``save_pretrained`` writes (e.g.
``model.layers.0.mlp.experts.3.gate_proj.weight``), which is also what published checkpoints use.

Only torch, safetensors and json are imported: engine and worker processes call this too, and
they must not pay for importing transformers.
"""

from __future__ import annotations

import json
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from elasticmoe.model.config import SUPPORTED_MODEL_TYPES

__all__ = ["ARCHS", "PRESETS", "build_config", "expert_count_key", "init_model"]

# init-model writes every family the engine reads (one list: model/config.py's)
ARCHS: tuple[str, ...] = SUPPORTED_MODEL_TYPES
PRESETS: tuple[str, ...] = ("tiny", "small")

_ARCHITECTURES = {
    "mixtral": "MixtralForCausalLM",
    "qwen2_moe": "Qwen2MoeForCausalLM",
    "qwen3_moe": "Qwen3MoeForCausalLM",
    "olmoe": "OlmoeForCausalLM",
    "deepseek_v3": "DeepseekV3ForCausalLM",
    "glm4_moe": "Glm4MoeForCausalLM",
    "gpt_oss": "GptOssForCausalLM",
}

# transformers names the expert count differently per family; the config key that its config
# class serialises is the one that must be written (mixtral and qwen3_moe map the other name
# onto it through `attribute_map`).
_EXPERT_COUNT_KEY = {
    "mixtral": "num_local_experts",
    "qwen2_moe": "num_experts",
    "qwen3_moe": "num_local_experts",
    "olmoe": "num_experts",
    "deepseek_v3": "n_routed_experts",
    "glm4_moe": "n_routed_experts",
    "gpt_oss": "num_local_experts",
}

# deepseek_v3's multi-head latent attention and routing at each preset size (the rest comes
# from _PRESET_VALUES): one dense first layer, one shared expert, 4 expert groups.
_DEEPSEEK_VALUES: dict[str, dict[str, int]] = {
    "tiny": {
        "q_lora_rank": 32,
        "kv_lora_rank": 32,
        "qk_nope_head_dim": 16,
        "qk_rope_head_dim": 8,
        "v_head_dim": 16,
        "n_group": 4,
        "topk_group": 2,
        "intermediate_size": 128,
    },
    "small": {
        "q_lora_rank": 128,
        "kv_lora_rank": 64,
        "qk_nope_head_dim": 32,
        "qk_rope_head_dim": 16,
        "v_head_dim": 32,
        "n_group": 4,
        "topk_group": 2,
        "intermediate_size": 768,
    },
}

_PRESET_VALUES: dict[str, dict[str, int]] = {
    "tiny": {
        "hidden_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": 16,
        "num_experts": 8,
        "num_experts_per_tok": 2,
        "expert_intermediate_size": 64,
        "shared_expert_intermediate_size": 96,
        "vocab_size": 512,
        "max_position_embeddings": 2048,
    },
    "small": {
        "hidden_size": 256,
        "num_hidden_layers": 4,
        "num_attention_heads": 8,
        "num_key_value_heads": 4,
        "head_dim": 32,
        "num_experts": 16,
        "num_experts_per_tok": 2,
        "expert_intermediate_size": 384,
        "shared_expert_intermediate_size": 512,
        "vocab_size": 4096,
        "max_position_embeddings": 4096,
    },
}

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
_INIT_STD = 0.02
# Ids in the tokenizer built by elasticmoe.model.tokenizer: <|endoftext|>=0, <|im_end|>=2,
# <|pad|>=3.
_EOS_ID = 0
_IM_END_ID = 2
_PAD_ID = 3


def _check_choice(kind: str, value: str, options: tuple[str, ...]) -> None:
    if value not in options:
        raise ValueError(f"unknown {kind} {value!r}; valid options: {', '.join(options)}")


def expert_count_key(arch: str) -> str:
    """The config.json key that holds the routed-expert count for ``arch``."""
    _check_choice("arch", arch, ARCHS)
    return _EXPERT_COUNT_KEY[arch]


def build_config(arch: str, preset: str, **overrides: Any) -> dict[str, Any]:
    """Return a Hugging Face ``config.json`` dict for ``arch`` at size ``preset``.

    ``overrides`` replace keys of the result. Two conveniences keep overrides consistent:
    ``num_experts``/``num_local_experts`` are written under the key this family uses, and
    ``rope_theta`` is moved into ``rope_parameters``. ``layer_types`` (qwen2_moe) follows an
    overridden ``num_hidden_layers`` unless it is overridden too.
    """
    _check_choice("arch", arch, ARCHS)
    _check_choice("preset", preset, PRESETS)
    p = _PRESET_VALUES[preset]
    layers = p["num_hidden_layers"]
    expert_key = _EXPERT_COUNT_KEY[arch]

    cfg: dict[str, Any] = {
        "architectures": [_ARCHITECTURES[arch]],
        "model_type": arch,
        "vocab_size": p["vocab_size"],
        "hidden_size": p["hidden_size"],
        "num_hidden_layers": layers,
        "num_attention_heads": p["num_attention_heads"],
        "num_key_value_heads": p["num_key_value_heads"],
        "head_dim": p["head_dim"],
        "hidden_act": "silu",
        "max_position_embeddings": p["max_position_embeddings"],
        "initializer_range": _INIT_STD,
        "rms_norm_eps": 1e-6 if arch.startswith("qwen") else 1e-5,
        "rope_parameters": {
            "rope_type": "default",
            "rope_theta": 1_000_000.0 if arch in ("mixtral", "qwen3_moe") else 10_000.0,
        },
        "attention_dropout": 0.0,
        "use_cache": True,
        "tie_word_embeddings": False,
        "bos_token_id": _EOS_ID,
        "eos_token_id": _EOS_ID,
        # olmoe's config class defaults pad_token_id to 1, which is <|im_start|> in our vocab.
        "pad_token_id": _PAD_ID,
        "dtype": "float32",
        expert_key: p["num_experts"],
        "num_experts_per_tok": p["num_experts_per_tok"],
        "output_router_logits": False,
        "router_aux_loss_coef": 0.01 if arch == "olmoe" else 0.001,
    }
    if arch == "mixtral":
        cfg.update(
            intermediate_size=p["expert_intermediate_size"],
            sliding_window=None,
            router_jitter_noise=0.0,
        )
    elif arch == "glm4_moe":
        # GLM-4.5(-Air)-like: sigmoid router without auxiliary loss (no router_aux_loss_coef),
        # routed weights scaled by 2.5, one ungated shared expert, the first layer dense, qkv
        # bias, half of each head rotated. One expert group: the published configs use
        # n_group=topk_group=1 (the grouped path is tested on transformers-built models).
        del cfg["router_aux_loss_coef"]
        cfg["rope_parameters"] = {
            "rope_type": "default",
            "rope_theta": 1_000_000.0,
            "partial_rotary_factor": 0.5,
        }
        cfg.update(
            intermediate_size=p["shared_expert_intermediate_size"],
            moe_intermediate_size=p["expert_intermediate_size"],
            first_k_dense_replace=1,
            n_shared_experts=1,
            n_group=1,
            topk_group=1,
            routed_scaling_factor=2.5,
            norm_topk_prob=True,
            attention_bias=True,
            use_qk_norm=False,
            # no multi-token-prediction layers are written
            num_nextn_predict_layers=0,
        )
    elif arch == "gpt_oss":
        # YaRN as gpt-oss ships it (truncate off), extending a quarter of the context 4x
        original = p["max_position_embeddings"] // 4
        cfg.update(
            intermediate_size=p["expert_intermediate_size"],
            attention_bias=True,
            sliding_window=128,
            layer_types=_gpt_oss_layer_types(layers),
            swiglu_alpha=1.702,
            swiglu_limit=7.0,
            rope_parameters={
                "rope_type": "yarn",
                "rope_theta": 150_000.0,
                "factor": p["max_position_embeddings"] / original,
                "original_max_position_embeddings": original,
                "beta_fast": 32.0,
                "beta_slow": 1.0,
                "truncate": False,
            },
        )
    elif arch == "olmoe":
        cfg.update(
            intermediate_size=p["expert_intermediate_size"],
            attention_bias=False,
            clip_qkv=None,
            norm_topk_prob=False,
        )
    elif arch == "deepseek_v3":
        d = _DEEPSEEK_VALUES[preset]
        max_pos = p["max_position_embeddings"]
        for key in ("router_aux_loss_coef", "output_router_logits"):
            cfg.pop(key)
        cfg.update(
            d,
            # MLA: every head reads the one latent; transformers' head_dim is the rotary dim
            num_key_value_heads=p["num_attention_heads"],
            head_dim=d["qk_rope_head_dim"],
            qk_head_dim=d["qk_nope_head_dim"] + d["qk_rope_head_dim"],
            moe_intermediate_size=p["expert_intermediate_size"],
            n_shared_experts=1,
            first_k_dense_replace=1,
            moe_layer_freq=1,
            norm_topk_prob=True,
            routed_scaling_factor=2.5,
            topk_method="noaux_tc",
            scoring_func="sigmoid",
            rope_interleave=True,
            attention_bias=False,
            num_nextn_predict_layers=0,
            output_router_logits=False,
            pretraining_tp=1,
            rms_norm_eps=1e-6,
            # YaRN x4 over a quarter of the context, as DeepSeek-V3 / Kimi K2 extend theirs
            rope_parameters={
                "rope_type": "yarn",
                "rope_theta": 10_000.0,
                "factor": 4.0,
                "original_max_position_embeddings": max_pos // 4,
                "beta_fast": 32,
                "beta_slow": 1,
                "mscale": 1.0,
                "mscale_all_dim": 1.0,
            },
        )
    else:
        # intermediate_size is the dense MLP of `mlp_only_layers`; none exist, but the field must
        # still be a valid int.
        cfg.update(
            intermediate_size=p["shared_expert_intermediate_size"],
            moe_intermediate_size=p["expert_intermediate_size"],
            decoder_sparse_step=1,
            mlp_only_layers=[],
            use_sliding_window=False,
            sliding_window=None,
        )
        if arch == "qwen2_moe":
            cfg.update(
                shared_expert_intermediate_size=p["shared_expert_intermediate_size"],
                norm_topk_prob=False,
                qkv_bias=True,
                # Qwen2MoeConfig turns sliding_window into 0 when sliding is off; write what it
                # would serialise so a load/save round trip is a no-op.
                sliding_window=0,
                max_window_layers=layers,
                layer_types=["full_attention"] * layers,
            )
        else:
            cfg.update(norm_topk_prob=True, attention_bias=False)

    overrides = dict(overrides)
    for alias in ("num_experts", "num_local_experts"):
        if alias in overrides and alias != expert_key:
            overrides[expert_key] = overrides.pop(alias)
    if "rope_theta" in overrides:
        rope = dict(overrides.pop("rope_parameters", cfg["rope_parameters"]))
        rope["rope_theta"] = float(overrides.pop("rope_theta"))
        overrides["rope_parameters"] = rope
    cfg.update(overrides)
    if arch == "gpt_oss" and "layer_types" not in overrides:
        cfg["layer_types"] = _gpt_oss_layer_types(cfg["num_hidden_layers"])
    if arch == "qwen2_moe" and "layer_types" not in overrides:
        cfg["layer_types"] = ["full_attention"] * cfg["num_hidden_layers"]
        cfg["max_window_layers"] = cfg["num_hidden_layers"]
    return cfg


def _gpt_oss_layer_types(num_layers: int) -> list[str]:
    # transformers' GptOssConfig default: even layers slide, odd layers attend to everything
    return ["sliding_attention" if i % 2 == 0 else "full_attention" for i in range(num_layers)]


def _gpt_oss_layer_specs(
    cfg: dict[str, Any], pre: str
) -> Iterator[tuple[str, tuple[int, ...], str]]:
    """One gpt_oss layer: biased attention with sinks, a biased router, stacked experts."""
    h = cfg["hidden_size"]
    n_heads = cfg["num_attention_heads"]
    n_kv = cfg["num_key_value_heads"]
    head_dim = cfg.get("head_dim") or h // n_heads
    n_experts = cfg["num_local_experts"]
    inter = cfg["intermediate_size"]
    attn = f"{pre}.self_attn"
    for proj, out_dim in (
        ("q", n_heads * head_dim),
        ("k", n_kv * head_dim),
        ("v", n_kv * head_dim),
    ):
        yield f"{attn}.{proj}_proj.weight", (out_dim, h), "linear"
        yield f"{attn}.{proj}_proj.bias", (out_dim,), "bias"
    yield f"{attn}.o_proj.weight", (h, n_heads * head_dim), "linear"
    yield f"{attn}.o_proj.bias", (h,), "bias"
    yield f"{attn}.sinks", (n_heads,), "bias"
    yield f"{pre}.mlp.router.weight", (n_experts, h), "router"
    yield f"{pre}.mlp.router.bias", (n_experts,), "bias"
    experts = f"{pre}.mlp.experts"
    yield f"{experts}.gate_up_proj", (n_experts, h, 2 * inter), "linear"
    yield f"{experts}.gate_up_proj_bias", (n_experts, 2 * inter), "bias"
    yield f"{experts}.down_proj", (n_experts, inter, h), "linear"
    yield f"{experts}.down_proj_bias", (n_experts, h), "bias"
    yield f"{pre}.input_layernorm.weight", (h,), "norm"
    yield f"{pre}.post_attention_layernorm.weight", (h,), "norm"


def _tensor_specs(arch: str, cfg: dict[str, Any]) -> Iterator[tuple[str, tuple[int, ...], str]]:
    """Yield (name, shape, init kind) in the module order HF's state_dict uses."""
    h = cfg["hidden_size"]
    n_heads = cfg["num_attention_heads"]
    n_kv = cfg["num_key_value_heads"]
    head_dim = cfg.get("head_dim") or h // n_heads
    n_experts = cfg[_EXPERT_COUNT_KEY[arch]]
    inter = (
        cfg["intermediate_size"]
        if arch in ("mixtral", "olmoe", "gpt_oss")
        else cfg["moe_intermediate_size"]
    )
    qkv_bias = (arch == "qwen2_moe" and cfg.get("qkv_bias", True)) or (
        arch == "glm4_moe" and cfg.get("attention_bias", False)
    )
    first_dense = cfg.get("first_k_dense_replace", 0) if arch == "glm4_moe" else 0

    yield "model.embed_tokens.weight", (cfg["vocab_size"], h), "embed"
    if arch == "deepseek_v3":
        yield from _deepseek_layer_specs(cfg)
        yield "model.norm.weight", (h,), "norm"
        yield "lm_head.weight", (cfg["vocab_size"], h), "head"
        return
    for i in range(cfg["num_hidden_layers"]):
        pre = f"model.layers.{i}"
        if arch == "gpt_oss":
            yield from _gpt_oss_layer_specs(cfg, pre)
            continue
        attn = f"{pre}.self_attn"
        for proj, out_dim in (
            ("q", n_heads * head_dim),
            ("k", n_kv * head_dim),
            ("v", n_kv * head_dim),
        ):
            yield f"{attn}.{proj}_proj.weight", (out_dim, h), "linear"
            if qkv_bias:
                yield f"{attn}.{proj}_proj.bias", (out_dim,), "bias"
        yield f"{attn}.o_proj.weight", (h, n_heads * head_dim), "linear"
        if arch == "qwen3_moe" or (arch == "glm4_moe" and cfg.get("use_qk_norm")):
            # Per-head norms (only over head_dim), unlike olmoe's whole-projection norms.
            yield f"{attn}.q_norm.weight", (head_dim,), "norm"
            yield f"{attn}.k_norm.weight", (head_dim,), "norm"
        elif arch == "olmoe":
            yield f"{attn}.q_norm.weight", (h,), "norm"
            yield f"{attn}.k_norm.weight", (n_kv * head_dim,), "norm"

        if i < first_dense:
            mlp, dense = f"{pre}.mlp", cfg["intermediate_size"]
            yield f"{mlp}.gate_proj.weight", (dense, h), "linear"
            yield f"{mlp}.up_proj.weight", (dense, h), "linear"
            yield f"{mlp}.down_proj.weight", (h, dense), "linear"
        elif arch == "mixtral":
            moe = f"{pre}.block_sparse_moe"
            yield f"{moe}.gate.weight", (n_experts, h), "router"
            for e in range(n_experts):
                yield f"{moe}.experts.{e}.w1.weight", (inter, h), "linear"
                yield f"{moe}.experts.{e}.w2.weight", (h, inter), "linear"
                yield f"{moe}.experts.{e}.w3.weight", (inter, h), "linear"
        else:
            moe = f"{pre}.mlp"
            yield f"{moe}.gate.weight", (n_experts, h), "router"
            if arch == "glm4_moe":
                yield f"{moe}.gate.e_score_correction_bias", (n_experts,), "bias"
            for e in range(n_experts):
                yield f"{moe}.experts.{e}.gate_proj.weight", (inter, h), "linear"
                yield f"{moe}.experts.{e}.up_proj.weight", (inter, h), "linear"
                yield f"{moe}.experts.{e}.down_proj.weight", (h, inter), "linear"
            if arch == "qwen2_moe":
                shared = cfg["shared_expert_intermediate_size"]
                yield f"{moe}.shared_expert.gate_proj.weight", (shared, h), "linear"
                yield f"{moe}.shared_expert.up_proj.weight", (shared, h), "linear"
                yield f"{moe}.shared_expert.down_proj.weight", (h, shared), "linear"
                yield f"{moe}.shared_expert_gate.weight", (1, h), "linear"
            if arch == "glm4_moe":
                shared = cfg["n_shared_experts"] * inter
                yield f"{moe}.shared_experts.gate_proj.weight", (shared, h), "linear"
                yield f"{moe}.shared_experts.up_proj.weight", (shared, h), "linear"
                yield f"{moe}.shared_experts.down_proj.weight", (h, shared), "linear"
        yield f"{pre}.input_layernorm.weight", (h,), "norm"
        yield f"{pre}.post_attention_layernorm.weight", (h,), "norm"
    yield "model.norm.weight", (h,), "norm"
    yield "lm_head.weight", (cfg["vocab_size"], h), "head"


def _deepseek_layer_specs(cfg: dict[str, Any]) -> Iterator[tuple[str, tuple[int, ...], str]]:
    """deepseek_v3's decoder layers: MLA attention, dense then MoE MLPs with shared experts."""
    h = cfg["hidden_size"]
    n_heads = cfg["num_attention_heads"]
    qk_dim = cfg["qk_nope_head_dim"] + cfg["qk_rope_head_dim"]
    lora, q_lora = cfg["kv_lora_rank"], cfg.get("q_lora_rank")
    n_experts, inter = cfg["n_routed_experts"], cfg["moe_intermediate_size"]
    for i in range(cfg["num_hidden_layers"]):
        pre = f"model.layers.{i}"
        attn = f"{pre}.self_attn"
        if q_lora is None:
            yield f"{attn}.q_proj.weight", (n_heads * qk_dim, h), "linear"
        else:
            yield f"{attn}.q_a_proj.weight", (q_lora, h), "linear"
            yield f"{attn}.q_a_layernorm.weight", (q_lora,), "norm"
            yield f"{attn}.q_b_proj.weight", (n_heads * qk_dim, q_lora), "linear"
        yield f"{attn}.kv_a_proj_with_mqa.weight", (lora + cfg["qk_rope_head_dim"], h), "linear"
        yield f"{attn}.kv_a_layernorm.weight", (lora,), "norm"
        yield (
            f"{attn}.kv_b_proj.weight",
            (n_heads * (cfg["qk_nope_head_dim"] + cfg["v_head_dim"]), lora),
            "linear",
        )
        yield f"{attn}.o_proj.weight", (h, n_heads * cfg["v_head_dim"]), "linear"
        mlp = f"{pre}.mlp"
        if i < cfg["first_k_dense_replace"] or i % cfg.get("moe_layer_freq", 1):
            dense = cfg["intermediate_size"]
            yield f"{mlp}.gate_proj.weight", (dense, h), "linear"
            yield f"{mlp}.up_proj.weight", (dense, h), "linear"
            yield f"{mlp}.down_proj.weight", (h, dense), "linear"
        else:
            yield f"{mlp}.gate.weight", (n_experts, h), "router"
            # the selection-only bias (transformers would zero it; random keeps it exercised)
            yield f"{mlp}.gate.e_score_correction_bias", (n_experts,), "bias"
            for e in range(n_experts):
                yield f"{mlp}.experts.{e}.gate_proj.weight", (inter, h), "linear"
                yield f"{mlp}.experts.{e}.up_proj.weight", (inter, h), "linear"
                yield f"{mlp}.experts.{e}.down_proj.weight", (h, inter), "linear"
            shared = cfg["n_shared_experts"] * inter
            yield f"{mlp}.shared_experts.gate_proj.weight", (shared, h), "linear"
            yield f"{mlp}.shared_experts.up_proj.weight", (shared, h), "linear"
            yield f"{mlp}.shared_experts.down_proj.weight", (h, shared), "linear"
        yield f"{pre}.input_layernorm.weight", (h,), "norm"
        yield f"{pre}.post_attention_layernorm.weight", (h,), "norm"


def _init_tensor(
    name: str, shape: tuple[int, ...], kind: str, seed: int, hidden: int
) -> torch.Tensor:
    if kind == "norm":
        return torch.ones(shape)
    # One generator per tensor, keyed by its name, so a tensor's values depend only on (seed,
    # name): adding layers or experts through overrides leaves existing tensors unchanged.
    gen = torch.Generator().manual_seed((seed * 0x9E3779B1 + zlib.crc32(name.encode())) % 2**63)
    # Router and LM head get std 1/sqrt(hidden) (logits of unit scale) instead of 0.02: with tiny
    # logits, top-k expert choices and the argmax token are near-ties that flip under
    # bf16-vs-fp32 rounding, which makes comparisons between implementations flaky.
    std = hidden**-0.5 if kind in ("router", "head") else _INIT_STD
    return torch.randn(shape, generator=gen) * std


def _shard(names: list[str], sizes: dict[str, int], max_bytes: int | None) -> list[list[str]]:
    # Same greedy rule as huggingface_hub's split_state_dict_into_shards: start a new shard when
    # the next tensor would overflow, and give oversized tensors a shard of their own.
    if max_bytes is None:
        return [names]
    shards: list[list[str]] = []
    current: list[str] = []
    current_size = 0
    for name in names:
        size = sizes[name]
        if size > max_bytes:
            shards.append([name])
            continue
        if current and current_size + size > max_bytes:
            shards.append(current)
            current, current_size = [], 0
        current.append(name)
        current_size += size
    if current:
        shards.append(current)
    return shards


def _write_json(path: Path, obj: dict[str, Any]) -> None:
    path.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def init_model(
    arch: str,
    preset: str,
    out_dir: str | Path,
    *,
    seed: int = 0,
    dtype: str = "float32",
    max_shard_size_mb: float | None = None,
    overwrite: bool = False,
    **overrides: Any,
) -> Path:
    """Write a random-weight checkpoint of ``arch``/``preset`` to ``out_dir`` and return it.

    The directory gets ``config.json``, ``generation_config.json``, tokenizer files and
    safetensors weights (one file, or HF-style shards plus ``model.safetensors.index.json``
    when ``max_shard_size_mb`` is set; "MB" means 10**6 bytes as in transformers). Weights are
    deterministic in ``seed``. ``overrides`` go to :func:`build_config`. An existing non-empty
    ``out_dir`` raises ``FileExistsError`` unless ``overwrite=True``.
    """
    # Imported here so `import elasticmoe.model.init_model` stays cheap for callers that only
    # need build_config.
    from elasticmoe.model.tokenizer import build_tokenizer, save_tokenizer_files

    _check_choice("arch", arch, ARCHS)
    _check_choice("preset", preset, PRESETS)
    _check_choice("dtype", dtype, tuple(_DTYPES))
    if max_shard_size_mb is not None and max_shard_size_mb <= 0:
        raise ValueError(f"max_shard_size_mb must be positive, got {max_shard_size_mb}")

    out = Path(out_dir)
    if out.exists():
        if not out.is_dir():
            raise FileExistsError(f"{out} exists and is not a directory")
        if any(out.iterdir()):
            if not overwrite:
                raise FileExistsError(f"{out} is not empty; pass overwrite=True to replace it")
            # Stale shards from an earlier, differently sharded run would be picked up by
            # loaders that glob *.safetensors, so remove our weight files (and only those).
            for stale in (*out.glob("model*.safetensors"), out / "model.safetensors.index.json"):
                stale.unlink(missing_ok=True)
    out.mkdir(parents=True, exist_ok=True)

    cfg = build_config(arch, preset, dtype=dtype, **overrides)
    torch_dtype = _DTYPES[dtype]

    tok = build_tokenizer(cfg["vocab_size"])
    save_tokenizer_files(tok, out, model_max_length=cfg["max_position_embeddings"])
    _write_json(out / "config.json", cfg)
    _write_json(
        out / "generation_config.json",
        {
            "bos_token_id": cfg["bos_token_id"],
            # <|im_end|> ends an assistant turn in the ChatML template, so chat requests stop
            # there too and not only at <|endoftext|>.
            "eos_token_id": sorted({cfg["eos_token_id"], _IM_END_ID}),
            "pad_token_id": cfg["pad_token_id"],
        },
    )

    tensors: dict[str, torch.Tensor] = {}
    for name, shape, kind in _tensor_specs(arch, cfg):
        # the router's selection bias stays fp32 in any dtype, as in published checkpoints
        tensor_dtype = torch.float32 if name.endswith("e_score_correction_bias") else torch_dtype
        tensors[name] = _init_tensor(name, shape, kind, seed, cfg["hidden_size"]).to(tensor_dtype)
    names = list(tensors)
    sizes = {n: t.numel() * t.element_size() for n, t in tensors.items()}
    max_bytes = None if max_shard_size_mb is None else int(max_shard_size_mb * 1_000_000)
    shards = _shard(names, sizes, max_bytes)

    metadata = {"format": "pt"}
    if len(shards) == 1:
        save_file(tensors, str(out / "model.safetensors"), metadata=metadata)
        return out

    weight_map: dict[str, str] = {}
    for idx, shard_names in enumerate(shards, start=1):
        filename = f"model-{idx:05d}-of-{len(shards):05d}.safetensors"
        save_file({n: tensors[n] for n in shard_names}, str(out / filename), metadata=metadata)
        weight_map.update(dict.fromkeys(shard_names, filename))
    index = {
        "metadata": {
            "total_parameters": sum(t.numel() for t in tensors.values()),
            "total_size": sum(sizes.values()),
        },
        "weight_map": weight_map,
    }
    _write_json(out / "model.safetensors.index.json", index)
    return out
