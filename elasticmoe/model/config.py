"""The model configuration elasticmoe needs, read from a Hugging Face config.json.

Each supported family (``model_type``) differs in a handful of switches
(q/k norm, qkv bias, shared expert, top-k renormalisation; gpt_oss's sinks, per-layer
windows, biases and clamped SwiGLU in :class:`GptOssParts`); they are all
resolved here so the model code reads one flat config and never branches on
the family name.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

SUPPORTED_MODEL_TYPES = (
    "mixtral",
    "qwen2_moe",
    "qwen3_moe",
    "olmoe",
    "deepseek_v3",
    "glm4_moe",
    "gpt_oss",
)

QKNorm = Literal["none", "per_head", "full"]
# How the router turns logits into expert scores: softmax over all experts (mixtral, qwen,
# olmoe) or per-expert sigmoid with a selection bias and group-limited top-k (deepseek_v3,
# glm4_moe).
ScoringFunc = Literal["softmax", "sigmoid"]


ROPE_TYPES = ("default", "yarn")


@dataclass(frozen=True)
class RopeScaling:
    """The parameters of a scaled RoPE (``rope_parameters`` / ``rope_scaling`` in config.json).

    ``factor``: context extension factor; ``original_max_position_embeddings``: the
    pre-training context; ``attention_factor``: explicit cos/sin multiplier (else derived
    from ``factor``, ``mscale`` and ``mscale_all_dim``); ``truncate``: round the correction
    range to whole dims (transformers' default; gpt-oss sets it False).
    """

    rope_type: str
    factor: float
    original_max_position_embeddings: int
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    mscale: float | None = None
    mscale_all_dim: float | None = None
    attention_factor: float | None = None
    truncate: bool = True


class ConfigError(ValueError):
    """A checkpoint's config.json is missing a field or holds an unsupported value."""


@dataclass(frozen=True)
class ExpertActivation:
    """How an expert turns its gate and up projections into the down projection's input.

    ``silu``: ``silu(gate) * up`` (every family but gpt_oss). ``clamped_swiglu`` (gpt_oss):
    ``(clamp(up, -limit, limit) + 1) * g * sigmoid(alpha * g)``, ``g = clamp(gate, max=limit)``.
    Pure data: ``elasticmoe.model.moe.activate`` computes it.
    """

    name: Literal["silu", "clamped_swiglu"] = "silu"
    alpha: float = 0.0
    limit: float = 0.0


SILU = ExpertActivation()


@dataclass(frozen=True)
class MoEModelConfig:
    """Everything the model code needs to build an MoE decoder.

    ``moe_layers`` lists the layer indices whose MLP is a sparse MoE block; the
    remaining layers use a dense MLP of ``intermediate_size``.
    """

    model_type: str
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    max_position_embeddings: int
    num_experts: int
    top_k: int
    expert_intermediate_size: int
    intermediate_size: int
    norm_topk_prob: bool
    qkv_bias: bool
    qk_norm: QKNorm
    shared_expert_intermediate_size: int = 0
    clip_qkv: float | None = None
    sliding_window: int | None = None
    tie_word_embeddings: bool = False
    moe_layers: tuple[int, ...] = ()
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    rope_scaling: RopeScaling | None = None
    # Multi-head latent attention (deepseek_v3, kimi k2), on when kv_lora_rank > 0: queries
    # through a q_lora_rank bottleneck (None: a plain q_proj), keys/values from one
    # kv_lora_rank latent per token plus a shared qk_rope_head_dim rotary key; head_dim is
    # then the rotary dim. rope_interleave: the rotary dims come in (even, odd) pairs.
    q_lora_rank: int | None = None
    kv_lora_rank: int = 0
    qk_nope_head_dim: int = 0
    qk_rope_head_dim: int = 0
    v_head_dim: int = 0
    rope_interleave: bool = False
    # Router of the "sigmoid" kind (see elasticmoe.model.gate.grouped_topk_sigmoid_gate): its
    # gate carries an `e_score_correction_bias` buffer; experts are picked within the
    # `topk_group` best of `n_group` groups; the weights are scaled by `routed_scaling_factor`.
    scoring_func: ScoringFunc = "softmax"
    n_group: int = 1
    topk_group: int = 1
    routed_scaling_factor: float = 1.0
    # deepseek_v3/glm4_moe-style ungated shared experts: one SwiGLU MLP (`shared_experts`) of
    # n_shared_experts * expert_intermediate_size, added to the routed output.
    n_shared_experts: int = 0
    # Fraction of each head's dims that RoPE rotates (glm4_moe: the first half, rotate-half
    # layout within it); the rest passes through unrotated.
    partial_rotary_factor: float = 1.0
    # gpt_oss: per-layer windows (None: full attention), learned attention sinks, o_proj
    # bias, router bias, expert biases and the clamped SwiGLU (see GptOssParts).
    gpt_oss: GptOssParts | None = None
    raw: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)

    @property
    def has_shared_expert(self) -> bool:
        """qwen2_moe-style gated shared expert computed next to the routed ones."""
        return self.shared_expert_intermediate_size > 0

    @property
    def is_mla(self) -> bool:
        """Whether attention is multi-head latent attention (a compressed-latent cache)."""
        return self.kv_lora_rank > 0

    @property
    def kv_cache_layout(self) -> tuple[tuple[str, int, int], ...]:
        """What one token stores in one layer's paged cache: (name, heads, dim) per tensor.

        GQA: K and V of num_kv_heads x head_dim; MLA: the one latent the heads share,
        kv_lora_rank + qk_rope_head_dim wide (not the expanded per-head K/V).
        """
        if self.is_mla:
            return (("latent", 1, self.kv_lora_rank + self.qk_rope_head_dim),)
        return (("k", self.num_kv_heads, self.head_dim), ("v", self.num_kv_heads, self.head_dim))

    @property
    def shared_experts_intermediate_size(self) -> int:
        """Width of the ungated ``shared_experts`` MLP (0: none)."""
        return self.n_shared_experts * self.expert_intermediate_size

    @property
    def rotary_dim(self) -> int:
        """Leading dims of each head that RoPE rotates."""
        return int(self.head_dim * self.partial_rotary_factor)
    def layer_sliding_window(self, layer: int) -> int | None:
        """The sliding window of ``layer``'s attention (None: full attention)."""
        if self.gpt_oss is not None:
            return self.gpt_oss.layer_windows[layer]
        return self.sliding_window

    @property
    def attention_sinks(self) -> bool:
        """Whether attention has a learned sink logit per head (gpt_oss)."""
        return self.gpt_oss is not None

    @property
    def o_bias(self) -> bool:
        """Whether o_proj has a bias (gpt_oss ``attention_bias``)."""
        return self.gpt_oss is not None and self.gpt_oss.attention_bias

    @property
    def router_bias(self) -> bool:
        """Whether the router (gate) linear has a bias (gpt_oss)."""
        return self.gpt_oss is not None

    @property
    def softmax_after_topk(self) -> bool:
        """The gate picks the top-k logits and softmaxes over those k (gpt_oss), instead of
        a softmax over all experts before the top-k."""
        return self.gpt_oss is not None

    @property
    def stacked_experts(self) -> bool:
        """The checkpoint holds one tensor per layer for all its experts (gpt_oss)."""
        return self.gpt_oss is not None

    @property
    def expert_bias(self) -> bool:
        """Whether routed experts carry gate_up and down biases (gpt_oss)."""
        return self.gpt_oss is not None

    @property
    def expert_activation(self) -> ExpertActivation:
        """The routed experts' activation: SwiGLU, or gpt_oss's clamped SwiGLU."""
        if self.gpt_oss is not None:
            return ExpertActivation(
                "clamped_swiglu", self.gpt_oss.swiglu_alpha, self.gpt_oss.swiglu_limit
            )
        return SILU

    def is_moe_layer(self, layer: int) -> bool:
        """Whether ``layer`` has a routed-expert MLP (vs a dense MLP)."""
        return layer in self.moe_layers


@dataclass(frozen=True)
class GptOssParts:
    """What gpt_oss adds to the shared config.

    layer_windows: per layer, the sliding window (``layer_types`` "sliding_attention") or
    None ("full_attention"). attention_bias: q/k/v/o projections have biases. The experts
    compute ``(clamp(up, -limit, limit) + 1) * g * sigmoid(alpha * g)`` with
    ``g = clamp(gate, max=limit)``.
    """

    layer_windows: tuple[int | None, ...]
    attention_bias: bool
    swiglu_alpha: float
    swiglu_limit: float


GPT_OSS_LAYER_TYPES = ("sliding_attention", "full_attention")


def _number(cfg: dict[str, Any], key: str, default: float, path: Path) -> float:
    value = cfg.get(key, default)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(f"{path}: {key}={value!r} must be a number")
    return float(value)


def _gpt_oss_parts(cfg: dict[str, Any], num_layers: int, path: Path) -> GptOssParts:
    import math

    window = cfg.get("sliding_window", 128)
    layer_types = cfg.get("layer_types")
    if layer_types is None:  # transformers' default: even layers slide, odd are full
        layer_types = [GPT_OSS_LAYER_TYPES[i % 2] for i in range(num_layers)]
    if not isinstance(layer_types, list) or len(layer_types) != num_layers:
        raise ConfigError(
            f"{path}: layer_types must be a list of {num_layers} entries (num_hidden_layers)"
        )
    bad = [t for t in layer_types if t not in GPT_OSS_LAYER_TYPES]
    if bad:
        raise ConfigError(
            f"{path}: layer_types has {bad[0]!r}; supported: {', '.join(GPT_OSS_LAYER_TYPES)}"
        )
    sliding = "sliding_attention" in layer_types
    if sliding and (isinstance(window, bool) or not isinstance(window, int) or window < 1):
        raise ConfigError(
            f"{path}: sliding_window={window!r} must be an integer >= 1 "
            "(layer_types has sliding_attention layers)"
        )
    alpha = _number(cfg, "swiglu_alpha", 1.702, path)
    limit = _number(cfg, "swiglu_limit", 7.0, path)
    for name, value in (("swiglu_alpha", alpha), ("swiglu_limit", limit)):
        if not (math.isfinite(value) and value > 0):
            raise ConfigError(f"{path}: {name}={value} must be a finite number > 0")
    return GptOssParts(
        layer_windows=tuple(window if t == "sliding_attention" else None for t in layer_types),
        attention_bias=bool(cfg.get("attention_bias", True)),
        swiglu_alpha=alpha,
        swiglu_limit=limit,
    )


def _check_quantization(cfg: dict[str, Any], model_type: str, path: Path) -> None:
    """Only gpt_oss's MXFP4 experts are read (dequantised at load); any other quantised
    checkpoint is refused here rather than failing on a missing tensor later."""
    qc = cfg.get("quantization_config")
    if qc is None:
        return
    method = qc.get("quant_method") if isinstance(qc, dict) else None
    if method != "mxfp4" or model_type != "gpt_oss":
        raise ConfigError(
            f"{path}: quantization_config.quant_method={method!r} is not supported for "
            f"model_type={model_type!r}; supported: 'mxfp4' (gpt_oss); dequantize the "
            "checkpoint to bf16 first"
        )


def _require(cfg: dict[str, Any], key: str, path: Path) -> Any:
    if key not in cfg:
        raise ConfigError(
            f"{path}: field '{key}' is missing (model_type={cfg.get('model_type')!r})"
        )
    return cfg[key]


def _first(cfg: dict[str, Any], keys: tuple[str, ...], path: Path) -> Any:
    for key in keys:
        if cfg.get(key) is not None:
            return cfg[key]
    raise ConfigError(f"{path}: none of the fields {list(keys)} is set")


def _rope_params(cfg: dict[str, Any]) -> dict[str, Any]:
    params = cfg.get("rope_parameters") or cfg.get("rope_scaling") or {}
    return params if isinstance(params, dict) else {}


def _rope_theta(cfg: dict[str, Any], path: Path) -> float:
    params = _rope_params(cfg)
    if params:
        rope_type = params.get("rope_type", params.get("type", "default"))
        if rope_type not in ROPE_TYPES:
            raise ConfigError(
                f"{path}: rope_parameters.rope_type={rope_type!r} is not supported; "
                f"supported: {', '.join(repr(t) for t in ROPE_TYPES)}"
            )
        if "rope_theta" in params:
            return float(params["rope_theta"])
    return float(cfg.get("rope_theta", 10000.0))


def _rope_scaling(cfg: dict[str, Any], path: Path) -> RopeScaling | None:
    """The YaRN parameters (None for the default RoPE), range-checked, as transformers
    reads them (``factor`` defaults to max_position_embeddings / original)."""
    import math

    params = _rope_params(cfg)
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type == "default":
        return None
    max_pos = int(cfg.get("max_position_embeddings", 4096))
    original = int(
        params.get("original_max_position_embeddings")
        or cfg.get("original_max_position_embeddings")
        or max_pos
    )
    factor = params.get("factor")
    factor = float(factor) if factor is not None else max_pos / original
    scaling = RopeScaling(
        rope_type=rope_type,
        factor=factor,
        original_max_position_embeddings=original,
        beta_fast=float(params.get("beta_fast") or 32.0),
        beta_slow=float(params.get("beta_slow") or 1.0),
        mscale=None if params.get("mscale") is None else float(params["mscale"]),
        mscale_all_dim=(
            None if params.get("mscale_all_dim") is None else float(params["mscale_all_dim"])
        ),
        attention_factor=(
            None if params.get("attention_factor") is None else float(params["attention_factor"])
        ),
        truncate=bool(params.get("truncate", True)),
    )
    if original < 1:
        raise ConfigError(
            f"{path}: rope_parameters.original_max_position_embeddings={original} must be >= 1"
        )
    for name in (
        "factor",
        "beta_fast",
        "beta_slow",
        "mscale",
        "mscale_all_dim",
        "attention_factor",
    ):
        value = getattr(scaling, name)
        if value is not None and not (math.isfinite(value) and value > 0):
            raise ConfigError(f"{path}: rope_parameters.{name}={value} must be a finite number > 0")
    return scaling


def _number(cfg: dict[str, Any], key: str, default: float, path: Path) -> float:
    value = cfg.get(key, default)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ConfigError(f"{path}: {key}={value!r} must be a number")
    return float(value)


def _integer(cfg: dict[str, Any], key: str, default: int, path: Path) -> int:
    value = cfg.get(key, default)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(f"{path}: {key}={value!r} must be an integer")
    return value


def _flag(cfg: dict[str, Any], key: str, default: bool, path: Path) -> bool:
    value = cfg.get(key, default)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise ConfigError(f"{path}: {key}={value!r} must be true or false")
    return value


def _partial_rotary_factor(cfg: dict[str, Any], default: float, path: Path) -> float:
    """transformers 5 writes it in rope_parameters; older checkpoints at the top level."""
    params = cfg.get("rope_parameters")
    if isinstance(params, dict) and params.get("partial_rotary_factor") is not None:
        return _number(params, "partial_rotary_factor", default, path)
    return _number(cfg, "partial_rotary_factor", default, path)


def _as_tuple(value: Any) -> tuple[int, ...]:
    if value is None:
        return ()
    if isinstance(value, int):
        return (value,)
    return tuple(int(v) for v in value)


def parse_config(cfg: dict[str, Any], path: Path | str = "config.json") -> MoEModelConfig:
    """Turn a Hugging Face config dict into an :class:`MoEModelConfig`.

    Raises :class:`ConfigError` naming the file and field when something is
    missing or unsupported.
    """
    path = Path(path)
    model_type = cfg.get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ConfigError(
            f"{path}: model_type={model_type!r} is not supported; "
            f"supported: {', '.join(SUPPORTED_MODEL_TYPES)}"
        )
    hidden = int(_require(cfg, "hidden_size", path))
    num_heads = int(_require(cfg, "num_attention_heads", path))
    num_layers = int(_require(cfg, "num_hidden_layers", path))
    if num_heads < 1:
        raise ConfigError(f"{path}: num_attention_heads={num_heads} must be >= 1")
    num_kv_heads = int(cfg.get("num_key_value_heads") or num_heads)
    head_dim = int(cfg.get("head_dim") or hidden // num_heads)
    num_experts = int(_first(cfg, ("num_local_experts", "num_experts", "n_routed_experts"), path))
    top_k = int(_require(cfg, "num_experts_per_tok", path))
    if not 1 <= top_k <= num_experts:
        raise ConfigError(f"{path}: num_experts_per_tok={top_k} must be in 1..{num_experts}")
    if num_heads % num_kv_heads:
        raise ConfigError(
            f"{path}: num_attention_heads={num_heads} is not a multiple of "
            f"num_key_value_heads={num_kv_heads}"
        )
    intermediate = int(cfg.get("intermediate_size") or 0)
    hidden_act = cfg.get("hidden_act", "silu")
    if hidden_act not in ("silu", "swish"):
        raise ConfigError(f"{path}: hidden_act={hidden_act!r} is not supported; supported: silu")

    moe_layers: tuple[int, ...] = tuple(range(num_layers))
    extra: dict[str, Any] = {}  # family-specific fields (deepseek_v3: MLA and routing)
    qkv_bias = False
    qk_norm: QKNorm = "none"
    shared = 0
    norm_topk = bool(cfg.get("norm_topk_prob", False))
    sliding_window = None
    routing: dict[str, Any] = {}
    gpt_oss = None
    _check_quantization(cfg, model_type, path)
    if model_type == "gpt_oss":
        expert_inter = int(_require(cfg, "intermediate_size", path))
        gpt_oss = _gpt_oss_parts(cfg, num_layers, path)
        qkv_bias = gpt_oss.attention_bias
        intermediate = 0  # every layer is MoE; intermediate_size is the experts' width
    elif model_type == "mixtral":
        expert_inter = int(_require(cfg, "intermediate_size", path))
        norm_topk = True  # mixtral always renormalises the top-k weights
        sliding_window = cfg.get("sliding_window")
    elif model_type == "olmoe":
        expert_inter = int(_require(cfg, "intermediate_size", path))
        qk_norm = "full"
    elif model_type == "deepseek_v3":  # also kimi k2
        expert_inter = int(_require(cfg, "moe_intermediate_size", path))
        extra = _deepseek_v3_fields(cfg, path, num_layers)
        moe_layers = extra.pop("moe_layers")
        head_dim = extra["qk_rope_head_dim"]  # the rotary dim, as transformers sets it
        norm_topk = bool(cfg.get("norm_topk_prob", True))
        qkv_bias = bool(cfg.get("attention_bias", False))
    elif model_type == "glm4_moe":
        expert_inter = int(_require(cfg, "moe_intermediate_size", path))
        first_dense = _integer(cfg, "first_k_dense_replace", 1, path)
        if not 0 <= first_dense <= num_layers:
            raise ConfigError(
                f"{path}: first_k_dense_replace={first_dense} must be in 0..{num_layers}"
            )
        moe_layers = tuple(range(first_dense, num_layers))
        qkv_bias = _flag(cfg, "attention_bias", False, path)
        qk_norm = "per_head" if _flag(cfg, "use_qk_norm", False, path) else "none"
        norm_topk = _flag(cfg, "norm_topk_prob", True, path)
        routing = dict(
            scoring_func="sigmoid",
            n_group=_integer(cfg, "n_group", 1, path),
            topk_group=_integer(cfg, "topk_group", 1, path),
            routed_scaling_factor=_number(cfg, "routed_scaling_factor", 1.0, path),
            n_shared_experts=_integer(cfg, "n_shared_experts", 1, path),
            partial_rotary_factor=_partial_rotary_factor(cfg, 0.5, path),
        )
    else:  # qwen2_moe, qwen3_moe
        expert_inter = int(_require(cfg, "moe_intermediate_size", path))
        step = int(cfg.get("decoder_sparse_step", 1) or 1)
        mlp_only = set(cfg.get("mlp_only_layers") or [])
        moe_layers = tuple(
            i for i in range(num_layers) if i not in mlp_only and (i + 1) % step == 0
        )
        if cfg.get("use_sliding_window"):
            sliding_window = cfg.get("sliding_window")
        if model_type == "qwen2_moe":
            qkv_bias = bool(cfg.get("qkv_bias", True))
            shared = int(cfg.get("shared_expert_intermediate_size") or 0)
        else:
            qkv_bias = bool(cfg.get("attention_bias", False))
            qk_norm = "per_head"
    if len(moe_layers) < num_layers and intermediate <= 0:
        raise ConfigError(f"{path}: intermediate_size is needed for the dense MLP layers")

    config = MoEModelConfig(
        model_type=model_type,
        vocab_size=int(_require(cfg, "vocab_size", path)),
        hidden_size=hidden,
        num_layers=num_layers,
        num_heads=num_heads,
        num_kv_heads=num_kv_heads,
        head_dim=head_dim,
        rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
        rope_theta=_rope_theta(cfg, path),
        rope_scaling=_rope_scaling(cfg, path),
        max_position_embeddings=int(cfg.get("max_position_embeddings", 4096)),
        num_experts=num_experts,
        top_k=top_k,
        expert_intermediate_size=expert_inter,
        intermediate_size=intermediate,
        norm_topk_prob=norm_topk,
        qkv_bias=qkv_bias,
        qk_norm=qk_norm,
        shared_expert_intermediate_size=shared,
        clip_qkv=cfg.get("clip_qkv"),
        sliding_window=int(sliding_window) if sliding_window else None,
        tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
        moe_layers=moe_layers,
        bos_token_id=cfg.get("bos_token_id"),
        eos_token_ids=_as_tuple(cfg.get("eos_token_id")),
        gpt_oss=gpt_oss,
        raw=cfg,
        **extra,
        **routing,
    )
    check_ranges(config, path)
    return config


# deepseek_v3 topk_method / scoring_func values elasticmoe implements (transformers' router)
DEEPSEEK_TOPK_METHODS = ("noaux_tc",)
DEEPSEEK_SCORING_FUNCS = ("sigmoid",)


def _deepseek_v3_fields(cfg: dict[str, Any], path: Path, num_layers: int) -> dict[str, Any]:
    """MLA, routing and dense-layer fields of a deepseek_v3 (or kimi k2) config.json.

    Defaults are transformers' DeepseekV3Config's. MoE layers: index >= first_k_dense_replace
    and a multiple of moe_layer_freq (DeepSeek's own modeling code; every real checkpoint
    has freq 1, which is what transformers assumes).
    """
    topk_method = cfg.get("topk_method") or "noaux_tc"
    if topk_method not in DEEPSEEK_TOPK_METHODS:
        raise ConfigError(
            f"{path}: topk_method={topk_method!r} is not supported; "
            f"supported: {', '.join(DEEPSEEK_TOPK_METHODS)}"
        )
    scoring = cfg.get("scoring_func") or "sigmoid"
    if scoring not in DEEPSEEK_SCORING_FUNCS:
        raise ConfigError(
            f"{path}: scoring_func={scoring!r} is not supported; "
            f"supported: {', '.join(DEEPSEEK_SCORING_FUNCS)}"
        )
    first_dense = int(cfg.get("first_k_dense_replace", 3) or 0)
    freq = int(cfg.get("moe_layer_freq", 1) or 1)
    if not 0 <= first_dense <= num_layers:
        raise ConfigError(f"{path}: first_k_dense_replace={first_dense} must be in 0..{num_layers}")
    if freq < 1:
        raise ConfigError(f"{path}: moe_layer_freq={freq} must be >= 1")
    q_lora_rank = cfg.get("q_lora_rank")
    if int(_require(cfg, "kv_lora_rank", path)) < 1:
        raise ConfigError(f"{path}: kv_lora_rank={cfg['kv_lora_rank']} must be >= 1")
    return {
        "moe_layers": tuple(i for i in range(num_layers) if i >= first_dense and i % freq == 0),
        "q_lora_rank": None if q_lora_rank is None else int(q_lora_rank),
        "kv_lora_rank": int(_require(cfg, "kv_lora_rank", path)),
        "qk_nope_head_dim": int(_require(cfg, "qk_nope_head_dim", path)),
        "qk_rope_head_dim": int(_require(cfg, "qk_rope_head_dim", path)),
        "v_head_dim": int(_require(cfg, "v_head_dim", path)),
        "rope_interleave": bool(cfg.get("rope_interleave", True)),
        "scoring_func": "sigmoid",
        "n_group": int(cfg.get("n_group") or 1),
        "topk_group": int(cfg.get("topk_group") or 1),
        "routed_scaling_factor": float(cfg.get("routed_scaling_factor", 1.0)),
        "n_shared_experts": int(cfg.get("n_shared_experts", 1) or 0),
    }


def _check_mla(c: MoEModelConfig, path: Path | str) -> None:
    """MLA sizes in range (only when the model uses MLA)."""
    if not c.is_mla:
        return
    for name, low in (("kv_lora_rank", 1), ("qk_nope_head_dim", 1), ("v_head_dim", 1)):
        value = getattr(c, name)
        if not low <= value <= 1 << 16:
            raise ConfigError(f"{path}: {name}={value} must be in {low}..{1 << 16}")
    if not 2 <= c.qk_rope_head_dim <= 4096 or c.qk_rope_head_dim % 2:
        raise ConfigError(
            f"{path}: qk_rope_head_dim={c.qk_rope_head_dim} must be an even number in 2..4096"
        )
    if c.q_lora_rank is not None and not 1 <= c.q_lora_rank <= 1 << 16:
        raise ConfigError(f"{path}: q_lora_rank={c.q_lora_rank} must be null or in 1..65536")


# field -> (lowest allowed, highest allowed); None: unbounded on that side
_INT_RANGES: dict[str, tuple[int, int | None]] = {
    "vocab_size": (1, 1 << 24),
    "hidden_size": (1, 1 << 17),
    "num_layers": (1, 1024),
    "num_heads": (1, 1024),
    "num_kv_heads": (1, 1024),
    "head_dim": (2, 4096),
    "max_position_embeddings": (1, 1 << 24),
    "num_experts": (1, 4096),
    "expert_intermediate_size": (1, 1 << 18),
    "intermediate_size": (0, 1 << 18),
    "shared_expert_intermediate_size": (0, 1 << 18),
    "n_shared_experts": (0, 64),
    "n_group": (1, 4096),
    "topk_group": (1, 4096),
}
# The Hugging Face names of the fields, for the error message.
_HF_NAME = {
    "num_layers": "num_hidden_layers",
    "num_heads": "num_attention_heads",
    "num_kv_heads": "num_key_value_heads",
    "num_experts": "num_local_experts / num_experts",
    "top_k": "num_experts_per_tok",
    "expert_intermediate_size": "moe_intermediate_size / intermediate_size",
}


def check_ranges(c: MoEModelConfig, path: Path | str = "config.json") -> None:
    """Every number in range: positive sizes and head counts, finite positive floats,
    token ids inside the vocabulary. A bad checkpoint fails at load, naming the field,
    instead of allocating absurd tensors or dividing by zero later."""
    import math

    for name, (low, high) in _INT_RANGES.items():
        value = getattr(c, name)
        if not low <= value <= (high if high is not None else value):
            bound = f"{low}..{high}" if high is not None else f">= {low}"
            raise ConfigError(f"{path}: {_HF_NAME.get(name, name)}={value} must be in {bound}")
    _check_mla(c, path)
    for name in ("rms_norm_eps", "rope_theta"):
        value = getattr(c, name)
        if not (math.isfinite(value) and value > 0):
            raise ConfigError(f"{path}: {name}={value} must be a finite number > 0")
    if c.scoring_func not in ("softmax", "sigmoid"):
        raise ConfigError(f"{path}: scoring_func={c.scoring_func!r} must be softmax or sigmoid")
    if not (math.isfinite(c.routed_scaling_factor) and c.routed_scaling_factor > 0):
        raise ConfigError(
            f"{path}: routed_scaling_factor={c.routed_scaling_factor} must be a finite number > 0"
        )
    if not (0 < c.partial_rotary_factor <= 1):
        raise ConfigError(
            f"{path}: partial_rotary_factor={c.partial_rotary_factor} must be in (0, 1]"
        )
    if c.rotary_dim < 2 or c.rotary_dim % 2:
        raise ConfigError(
            f"{path}: partial_rotary_factor={c.partial_rotary_factor} gives {c.rotary_dim} "
            f"rotary dims of head_dim={c.head_dim}; it must be an even number >= 2"
        )
    if c.num_experts % c.n_group:
        raise ConfigError(
            f"{path}: n_group={c.n_group} must divide the number of routed experts "
            f"({c.num_experts})"
        )
    if c.topk_group > c.n_group:
        raise ConfigError(f"{path}: topk_group={c.topk_group} must be in 1..n_group={c.n_group}")
    if c.top_k > c.topk_group * (c.num_experts // c.n_group):
        raise ConfigError(
            f"{path}: num_experts_per_tok={c.top_k} exceeds the experts of the topk_group="
            f"{c.topk_group} groups it may pick from ({c.num_experts // c.n_group} each)"
        )
    if c.clip_qkv is not None and not (math.isfinite(c.clip_qkv) and c.clip_qkv > 0):
        raise ConfigError(f"{path}: clip_qkv={c.clip_qkv} must be a finite number > 0")
    if c.sliding_window is not None and c.sliding_window < 1:
        raise ConfigError(f"{path}: sliding_window={c.sliding_window} must be >= 1")
    for name, ids in (("bos_token_id", (c.bos_token_id,)), ("eos_token_id", c.eos_token_ids)):
        bad = [t for t in ids if t is not None and not 0 <= int(t) < c.vocab_size]
        if bad:
            raise ConfigError(
                f"{path}: {name}={bad} is outside the vocabulary 0..{c.vocab_size - 1}"
            )


def load_config(model_dir: Path | str) -> MoEModelConfig:
    """Read and parse ``config.json`` from a checkpoint directory."""
    path = Path(model_dir) / "config.json"
    if not path.is_file():
        raise FileNotFoundError(
            f"{path}: no config.json; is {model_dir} a Hugging Face checkpoint?"
        )
    try:
        cfg = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path}: not valid JSON ({e})") from e
    if not isinstance(cfg, dict):
        raise ConfigError(f"{path}: expected a JSON object")
    return parse_config(cfg, path)
