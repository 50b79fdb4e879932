"""The MoE decoder (mixtral, qwen2_moe, qwen3_moe, olmoe) over a paged KV cache.

Module and parameter names mirror the Hugging Face checkpoints, so loading is
a name-for-name copy. Routed experts are not parameters of this module: each
MoE layer gates its rows and hands them to an :class:`ExpertBackend`, which
may compute them in-process or on remote expert workers.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from elasticmoe.model.attention import AttentionMetadata, PagedKVCache, paged_attention
from elasticmoe.model.checkpoint import CheckpointReader
from elasticmoe.model.config import MoEModelConfig, load_config
from elasticmoe.model.gate import GateOutput, topk_softmax_gate
from elasticmoe.model.moe import ExpertBackend, submit_experts, wait_experts

# Called once per MoE layer per step with the gate's tokens_per_expert.
LoadHook = Callable[[int, torch.Tensor], None]


class RMSNorm(nn.Module):
    """RMS norm computed in fp32, as the reference implementations do."""

    def __init__(self, size: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


def rotary_cos_sin(
    positions: torch.Tensor, head_dim: int, theta: float, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin tables [T, D] for the default RoPE."""
    inv_freq = 1.0 / (
        theta ** (torch.arange(0, head_dim, 2, device=positions.device).float() / head_dim)
    )
    freqs = positions.float()[:, None] * inv_freq[None, :]
    emb = torch.cat([freqs, freqs], dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x [T, H, D] by the per-token angles."""
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos[:, None, :] + rotated * sin[:, None, :]


class Attention(nn.Module):
    """GQA attention with optional qkv bias and q/k norm (per head or full width)."""

    def __init__(self, config: MoEModelConfig) -> None:
        super().__init__()
        c = config
        self.config = c
        self.q_proj = nn.Linear(c.hidden_size, c.num_heads * c.head_dim, bias=c.qkv_bias)
        self.k_proj = nn.Linear(c.hidden_size, c.num_kv_heads * c.head_dim, bias=c.qkv_bias)
        self.v_proj = nn.Linear(c.hidden_size, c.num_kv_heads * c.head_dim, bias=c.qkv_bias)
        self.o_proj = nn.Linear(c.num_heads * c.head_dim, c.hidden_size, bias=False)
        if c.qk_norm == "per_head":
            self.q_norm = RMSNorm(c.head_dim, c.rms_norm_eps)
            self.k_norm = RMSNorm(c.head_dim, c.rms_norm_eps)
        elif c.qk_norm == "full":
            self.q_norm = RMSNorm(c.num_heads * c.head_dim, c.rms_norm_eps)
            self.k_norm = RMSNorm(c.num_kv_heads * c.head_dim, c.rms_norm_eps)
        self.scale = c.head_dim**-0.5

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        meta: AttentionMetadata,
    ) -> torch.Tensor:
        c = self.config
        q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        if c.qk_norm == "full":
            q, k = self.q_norm(q), self.k_norm(k)
        if c.clip_qkv is not None:
            q, k, v = (t.clamp(-c.clip_qkv, c.clip_qkv) for t in (q, k, v))
        q = q.view(-1, c.num_heads, c.head_dim)
        k = k.view(-1, c.num_kv_heads, c.head_dim)
        v = v.view(-1, c.num_kv_heads, c.head_dim)
        if c.qk_norm == "per_head":
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        out = paged_attention(q, k, v, k_cache, v_cache, meta, self.scale, c.sliding_window)
        return self.o_proj(out.flatten(1))


class DenseMLP(nn.Module):
    """SwiGLU MLP: dense layers and qwen2_moe's shared expert."""

    def __init__(self, hidden: int, intermediate: int) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(hidden, intermediate, bias=False)
        self.up_proj = nn.Linear(hidden, intermediate, bias=False)
        self.down_proj = nn.Linear(intermediate, hidden, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class SparseMoE(nn.Module):
    """Gate in the engine, routed experts in the backend, shared expert in the engine."""

    def __init__(self, config: MoEModelConfig, layer: int) -> None:
        super().__init__()
        self.config = config
        self.layer = layer
        self.gate = nn.Linear(config.hidden_size, config.num_experts, bias=False)
        if config.has_shared_expert:
            self.shared_expert = DenseMLP(
                config.hidden_size, config.shared_expert_intermediate_size
            )
            self.shared_expert_gate = nn.Linear(config.hidden_size, 1, bias=False)

    def route(self, x: torch.Tensor) -> GateOutput:
        """Gate the rows x [T, H] to their top-k experts."""
        return topk_softmax_gate(
            self.gate(x), self.config.top_k, self.config.norm_topk_prob, x.dtype
        )

    def forward(
        self,
        x: torch.Tensor,
        experts: ExpertBackend,
        load_hook: LoadHook | None,
        num_padding: int = 0,
    ) -> torch.Tensor:
        """x: [T, H]; the last ``num_padding`` rows only pad the batch (not counted as load)."""
        gate = self.route(x)
        if load_hook is not None:
            counts = gate.tokens_per_expert
            if num_padding:
                flat = gate.indices[: x.shape[0] - num_padding].flatten()
                counts = torch.zeros_like(counts).scatter_add_(0, flat, torch.ones_like(flat))
            load_hook(self.layer, counts)
        if not self.config.has_shared_expert:
            return experts.forward(self.layer, x, gate)
        # the shared expert runs here while the routed experts run in the backend
        handle = submit_experts(experts, self.layer, x, gate)
        shared = torch.sigmoid(self.shared_expert_gate(x)) * self.shared_expert(x)
        return wait_experts(experts, handle) + shared


class DecoderLayer(nn.Module):
    """Pre-norm attention + (MoE or dense) MLP with residuals."""

    def __init__(self, config: MoEModelConfig, layer: int) -> None:
        super().__init__()
        self.self_attn = Attention(config)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.is_moe = config.is_moe_layer(layer)
        self.mlp: nn.Module = (
            SparseMoE(config, layer)
            if self.is_moe
            else DenseMLP(config.hidden_size, config.intermediate_size)
        )


class Backbone(nn.Module):
    """The ``model.`` prefix of the checkpoints: embeddings, layers, final norm."""

    def __init__(self, config: MoEModelConfig) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(config, i) for i in range(config.num_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)


class MoEForCausalLM(nn.Module):
    """An MoE decoder whose routed experts run in an :class:`ExpertBackend`."""

    def __init__(self, config: MoEModelConfig, experts: ExpertBackend | None = None) -> None:
        super().__init__()
        self.config = config
        self.model = Backbone(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.experts = experts

    @torch.inference_mode()
    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        meta: AttentionMetadata,
        kv_cache: PagedKVCache,
        logits_indices: torch.Tensor,
        load_hook: LoadHook | None = None,
    ) -> torch.Tensor:
        """Run T flat tokens; return fp32 logits [len(logits_indices), V]."""
        assert self.experts is not None, "set model.experts before running the model"
        c = self.config
        h = self.model.embed_tokens(input_ids)
        cos, sin = rotary_cos_sin(positions, c.head_dim, c.rope_theta, h.dtype)
        for i, layer in enumerate(self.model.layers):
            residual = h
            h = layer.input_layernorm(h)
            h = residual + layer.self_attn(h, cos, sin, kv_cache.k[i], kv_cache.v[i], meta)
            residual = h
            h = layer.post_attention_layernorm(h)
            if layer.is_moe:
                h = layer.mlp(h, self.experts, load_hook, meta.num_padding_tokens)
            else:
                h = layer.mlp(h)
            h = residual + h
        h = self.model.norm(h[logits_indices])
        return self.lm_head(h).float()

    def checkpoint_name(self, param_name: str) -> str:
        """The checkpoint tensor holding a parameter of this module."""
        if self.config.model_type == "mixtral":
            return param_name.replace(".mlp.gate.", ".block_sparse_moe.gate.")
        return param_name

    def load_weights(self, reader: CheckpointReader) -> None:
        """Copy every (non-expert) parameter from the checkpoint, checking shapes."""
        for name, param in self.named_parameters():
            ckpt_name = self.checkpoint_name(name)
            if name == "lm_head.weight" and not reader.has(ckpt_name):
                if not self.config.tie_word_embeddings:
                    reader.get(ckpt_name)  # raises: names the missing tensor
                ckpt_name = "model.embed_tokens.weight"
            with torch.no_grad():
                param.copy_(reader.get(ckpt_name, tuple(param.shape), param.dtype, param.device))

    @classmethod
    def from_checkpoint(
        cls,
        model_dir: Path | str,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
        reader: CheckpointReader | None = None,
    ) -> MoEForCausalLM:
        """Build the attention/gate part of the model from a checkpoint directory.

        Routed experts are not loaded; assign ``model.experts`` (e.g.
        ``LocalExperts.from_checkpoint(...)``) before running it.
        """
        config = load_config(model_dir)
        reader = reader or CheckpointReader(model_dir)
        with torch.device("meta"):
            model = cls(config)
        model = model.to_empty(device=device).to(dtype)
        model.load_weights(reader)
        model.eval()
        return model
