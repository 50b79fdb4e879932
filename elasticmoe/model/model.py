"""The MoE decoder (mixtral, qwen2_moe, qwen3_moe, olmoe, deepseek_v3, glm4_moe, gpt_oss)
over a paged KV cache.

Module and parameter names mirror the Hugging Face checkpoints, so loading is
a name-for-name copy. Routed experts are not parameters of this module: each
MoE layer gates its rows and hands them to an :class:`ExpertBackend`, which
may compute them in-process or on remote expert workers.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from elasticmoe.model.attention import (
    AttentionMetadata,
    PagedKVCache,
    paged_attention,
    paged_latent_attention,
)
from elasticmoe.model.checkpoint import CheckpointReader
from elasticmoe.model.config import MoEModelConfig, load_config
from elasticmoe.model.gate import (
    GateOutput,
    grouped_topk_sigmoid_gate,
    topk_logits_softmax_gate,
    topk_softmax_gate,
)
from elasticmoe.model.kernels import widen_linears
from elasticmoe.model.moe import ExpertBackend, submit_experts, wait_experts
from elasticmoe.model.rope import (
    apply_rotary,
    apply_rotary_interleaved,
    rotary_cos_sin,
    softmax_scale_mscale,
)

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


class Attention(nn.Module):
    """GQA attention with optional qkv bias and q/k norm (per head or full width); gpt_oss adds
    an o_proj bias, learned sinks and a per-layer sliding window."""

    def __init__(self, config: MoEModelConfig, layer: int = 0) -> None:
        super().__init__()
        c = config
        self.config = c
        self.sliding_window = c.layer_sliding_window(layer)
        self.q_proj = nn.Linear(c.hidden_size, c.num_heads * c.head_dim, bias=c.qkv_bias)
        self.k_proj = nn.Linear(c.hidden_size, c.num_kv_heads * c.head_dim, bias=c.qkv_bias)
        self.v_proj = nn.Linear(c.hidden_size, c.num_kv_heads * c.head_dim, bias=c.qkv_bias)
        self.o_proj = nn.Linear(c.num_heads * c.head_dim, c.hidden_size, bias=c.o_bias)
        self.sinks = nn.Parameter(torch.zeros(c.num_heads)) if c.attention_sinks else None
        if c.qk_norm == "per_head":
            self.q_norm = RMSNorm(c.head_dim, c.rms_norm_eps)
            self.k_norm = RMSNorm(c.head_dim, c.rms_norm_eps)
        elif c.qk_norm == "full":
            self.q_norm = RMSNorm(c.num_heads * c.head_dim, c.rms_norm_eps)
            self.k_norm = RMSNorm(c.num_kv_heads * c.head_dim, c.rms_norm_eps)
        self.scale = c.head_dim**-0.5
        self.qkv_proj: nn.Linear | None = None

    def fuse_projections(self) -> None:
        """After loading: one [q; k; v] matmul instead of three.

        ``q_proj``/``k_proj``/``v_proj`` keep their names (checkpoints, the controller's
        accounting) but become views of the fused weight, so nothing is stored twice.
        """
        if self.qkv_proj is not None:
            return
        projs = (self.q_proj, self.k_proj, self.v_proj)
        fused = nn.Linear(
            self.q_proj.in_features,
            sum(p.out_features for p in projs),
            bias=self.q_proj.bias is not None,
            device=self.q_proj.weight.device,
            dtype=self.q_proj.weight.dtype,
        )
        start = 0
        with torch.no_grad():
            for p in projs:
                end = start + p.out_features
                fused.weight[start:end] = p.weight
                p.weight = nn.Parameter(fused.weight.detach()[start:end], requires_grad=False)
                if p.bias is not None:
                    fused.bias[start:end] = p.bias
                    p.bias = nn.Parameter(fused.bias.detach()[start:end], requires_grad=False)
                start = end
        self.qkv_proj = fused

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        cache: tuple[torch.Tensor, ...],
        meta: AttentionMetadata,
    ) -> torch.Tensor:
        """x: [T, H]; cache: this layer's (k, v) block tensors."""
        k_cache, v_cache = cache
        q, k, v = self._rotated_qkv(x, cos, sin)
        out = paged_attention(
            q, k, v, k_cache, v_cache, meta, self.scale, self.sliding_window, self.sinks
        )
        return self.o_proj(out.flatten(1))

    def _rotated_qkv(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """q [T, Hq, D], k and v [T, Hkv, D], q and k rotated."""
        c = self.config
        nq, nkv = c.num_heads, c.num_kv_heads
        if self.qkv_proj is not None and c.qk_norm == "none":
            # q and k lie side by side in the fused output: one rotation for both
            qkv = self.qkv_proj(x)
            if c.clip_qkv is not None:
                qkv = qkv.clamp(-c.clip_qkv, c.clip_qkv)
            qkv = qkv.view(-1, nq + 2 * nkv, c.head_dim)
            qk = apply_rotary(qkv[:, : nq + nkv], cos, sin)
            return qk[:, :nq], qk[:, nq:], qkv[:, nq + nkv :]
        if self.qkv_proj is None:
            q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        else:
            q, k, v = self.qkv_proj(x).split([nq * c.head_dim, *(2 * [nkv * c.head_dim])], -1)
        if c.qk_norm == "full":
            q, k = self.q_norm(q), self.k_norm(k)
        if c.clip_qkv is not None:
            q, k, v = (t.clamp(-c.clip_qkv, c.clip_qkv) for t in (q, k, v))
        q = q.view(-1, nq, c.head_dim)
        k = k.view(-1, nkv, c.head_dim)
        v = v.view(-1, nkv, c.head_dim)
        if c.qk_norm == "per_head":
            q, k = self.q_norm(q), self.k_norm(k)
        return apply_rotary(q, cos, sin), apply_rotary(k, cos, sin), v


class MLAttention(nn.Module):
    """Multi-head latent attention (deepseek_v3), caching one compressed latent per token.

    Names as the checkpoint: ``q_a_proj``/``q_a_layernorm``/``q_b_proj`` (or ``q_proj`` when
    q_lora_rank is null), ``kv_a_proj_with_mqa``, ``kv_a_layernorm``, ``kv_b_proj``, ``o_proj``.
    Attention runs in the absorbed form for prefill and decode alike: kv_b_proj's K part
    [H, Dn, L] is folded into the query (q_nope @ W_UK), every head attends to the cached
    [c_kv, k_rope] latent, and its V part [H, Dv, L] maps the latent-space output back, so the
    per-head K/V are never materialised (what vLLM's MLA decode does).
    """

    def __init__(self, config: MoEModelConfig) -> None:
        super().__init__()
        c = self.config = config
        qk_dim = c.qk_nope_head_dim + c.qk_rope_head_dim
        if c.q_lora_rank is None:
            self.q_proj = nn.Linear(c.hidden_size, c.num_heads * qk_dim, bias=False)
        else:
            self.q_a_proj = nn.Linear(c.hidden_size, c.q_lora_rank, bias=c.qkv_bias)
            # transformers builds both latent norms with its default eps, not rms_norm_eps
            self.q_a_layernorm = RMSNorm(c.q_lora_rank, 1e-6)
            self.q_b_proj = nn.Linear(c.q_lora_rank, c.num_heads * qk_dim, bias=False)
        self.kv_a_proj_with_mqa = nn.Linear(
            c.hidden_size, c.kv_lora_rank + c.qk_rope_head_dim, bias=c.qkv_bias
        )
        self.kv_a_layernorm = RMSNorm(c.kv_lora_rank, 1e-6)
        self.kv_b_proj = nn.Linear(
            c.kv_lora_rank, c.num_heads * (c.qk_nope_head_dim + c.v_head_dim), bias=False
        )
        self.o_proj = nn.Linear(c.num_heads * c.v_head_dim, c.hidden_size, bias=c.qkv_bias)
        # YaRN's mscale enters the softmax scale (deepseek's yarn_apply_mscale)
        self.scale = qk_dim**-0.5 * softmax_scale_mscale(c.rope_scaling)

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        cache: tuple[torch.Tensor, ...],
        meta: AttentionMetadata,
    ) -> torch.Tensor:
        """x: [T, H]; cache: this layer's (latent,) block tensor [N, bs, 1, L + R]."""
        c = self.config
        heads, dn, dv = c.num_heads, c.qk_nope_head_dim, c.v_head_dim
        lora, rope = c.kv_lora_rank, c.qk_rope_head_dim
        if c.q_lora_rank is None:
            q = self.q_proj(x)
        else:
            q = self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x)))
        q_nope, q_rot = q.view(-1, heads, dn + rope).split([dn, rope], dim=-1)
        c_kv, k_rot = self.kv_a_proj_with_mqa(x).split([lora, rope], dim=-1)
        rotate = apply_rotary_interleaved if c.rope_interleave else apply_rotary
        q_rot, k_rot = rotate(q_rot, cos, sin), rotate(k_rot[:, None, :], cos, sin)
        w_kv = self.kv_b_proj.weight.view(heads, dn + dv, lora)
        # [H, T, Dn] @ [H, Dn, L] -> [T, H, L]
        q_lat = torch.bmm(q_nope.transpose(0, 1), w_kv[:, :dn]).transpose(0, 1)
        latent = torch.cat([self.kv_a_layernorm(c_kv)[:, None, :], k_rot], dim=-1)
        out = paged_latent_attention(
            torch.cat([q_lat, q_rot], dim=-1), latent, cache[0], meta, self.scale, lora
        )
        # [H, T, L] @ [H, L, Dv] -> [T, H, Dv]
        out = torch.bmm(out.transpose(0, 1), w_kv[:, dn:].transpose(1, 2)).transpose(0, 1)
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


# Checkpoint buffers (not parameters) that load_weights copies too; kept in fp32 whatever the
# model dtype, as transformers does (`_keep_in_fp32_modules_strict`).
FP32_BUFFERS = ("e_score_correction_bias",)


class SparseMoE(nn.Module):
    """Gate in the engine, routed experts in the backend, shared expert(s) in the engine."""

    def __init__(self, config: MoEModelConfig, layer: int) -> None:
        super().__init__()
        self.config = config
        self.layer = layer
        self.gate = nn.Linear(config.hidden_size, config.num_experts, bias=config.router_bias)
        if config.scoring_func == "sigmoid":
            # selection-only bias of the sigmoid router (`mlp.gate.e_score_correction_bias`)
            self.gate.register_buffer(
                "e_score_correction_bias", torch.zeros(config.num_experts, dtype=torch.float32)
            )
        if config.has_shared_expert:
            self.shared_expert = DenseMLP(
                config.hidden_size, config.shared_expert_intermediate_size
            )
            self.shared_expert_gate = nn.Linear(config.hidden_size, 1, bias=False)
        if config.n_shared_experts:
            self.shared_experts = DenseMLP(
                config.hidden_size, config.shared_experts_intermediate_size
            )

    def route(self, x: torch.Tensor) -> GateOutput:
        """Gate the rows x [T, H] to their top-k experts."""
        c = self.config
        if c.scoring_func == "sigmoid":
            # router logits in fp32 as transformers computes them (its gate stays fp32)
            logits = F.linear(x.float(), self.gate.weight.float())
            return grouped_topk_sigmoid_gate(
                logits,
                self.gate.e_score_correction_bias,
                c.top_k,
                c.n_group,
                c.topk_group,
                c.norm_topk_prob,
                c.routed_scaling_factor,
                x.dtype,
            )
        if c.softmax_after_topk:
            return topk_logits_softmax_gate(self.gate(x), c.top_k, x.dtype)
        return topk_softmax_gate(self.gate(x), c.top_k, c.norm_topk_prob, x.dtype)

    def forward(
        self,
        x: torch.Tensor,
        experts: ExpertBackend,
        load_hook: LoadHook | None,
        num_padding: int = 0,
    ) -> torch.Tensor:
        """x: [T, H]; the last ``num_padding`` rows only pad the batch (not counted as load)."""
        if not (self.config.has_shared_expert or self.config.n_shared_experts):
            gate = self.route_and_count(x, load_hook, num_padding)
            return experts.forward(self.layer, x, gate)
        return self.finish(experts, self.start(x, experts, load_hook, num_padding))

    def route_and_count(
        self, x: torch.Tensor, load_hook: LoadHook | None, num_padding: int = 0
    ) -> GateOutput:
        """Gate x [T, H] and report the layer's load (without the ``num_padding`` last rows)."""
        gate = self.route(x)
        if load_hook is not None:
            counts = gate.tokens_per_expert
            if num_padding:
                flat = gate.indices[: x.shape[0] - num_padding].flatten()
                counts = torch.zeros_like(counts).scatter_add_(0, flat, torch.ones_like(flat))
            load_hook(self.layer, counts)
        return gate

    def start(
        self,
        x: torch.Tensor,
        experts: ExpertBackend,
        load_hook: LoadHook | None,
        num_padding: int = 0,
        row_offset: int = 0,
    ) -> PendingMoE:
        """Gate x [T, H], submit its routed experts to the backend and run the shared
        expert(s) meanwhile; :meth:`finish` gives the layer's output.

        ``row_offset``: the step-flat row of ``x[0]`` (x is a micro-batch), so that the
        backend's ``lost_rows`` of this call index the step's tokens.
        """
        gate = self.route_and_count(x, load_hook, num_padding)
        num_lost = _num_lost_rows(experts)
        handle = submit_experts(experts, self.layer, x, gate)
        _shift_lost_rows(experts, num_lost, row_offset)
        shared = None
        # the shared expert(s) run here while the routed experts run in the backend
        if self.config.has_shared_expert:
            shared = torch.sigmoid(self.shared_expert_gate(x)) * self.shared_expert(x)
        elif self.config.n_shared_experts:
            shared = self.shared_experts(x)
        return PendingMoE(handle, shared, row_offset)

    def finish(self, experts: ExpertBackend, pending: PendingMoE) -> torch.Tensor:
        """Wait for what :meth:`start` submitted; returns the layer's output [T, H]."""
        num_lost = _num_lost_rows(experts)
        out = wait_experts(experts, pending.handle)
        _shift_lost_rows(experts, num_lost, pending.row_offset)
        return out if pending.shared is None else out + pending.shared


@dataclass
class PendingMoE:
    """An MoE layer whose routed experts are at the backend (:meth:`SparseMoE.start`)."""

    handle: Any
    shared: torch.Tensor | None  # the shared expert(s)' output, added by finish
    row_offset: int = 0


def _num_lost_rows(experts: ExpertBackend) -> int:
    return len(getattr(experts, "lost_rows", ()))


def _shift_lost_rows(experts: ExpertBackend, since: int, row_offset: int) -> None:
    """The rows a backend reported lost since entry ``since`` of its ``lost_rows`` index the
    micro-batch it was given; shift them by ``row_offset`` to index the step's flat tokens
    (what the engine maps back to requests)."""
    lost = getattr(experts, "lost_rows", None)
    if row_offset and lost is not None and len(lost) > since:
        lost[since:] = [(rows + row_offset, why) for rows, why in lost[since:]]


class DecoderLayer(nn.Module):
    """Pre-norm attention + (MoE or dense) MLP with residuals."""

    def __init__(self, config: MoEModelConfig, layer: int) -> None:
        super().__init__()
        self.self_attn: nn.Module = (
            MLAttention(config) if config.is_mla else Attention(config, layer)
        )
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
        meta: AttentionMetadata | Sequence[AttentionMetadata],
        kv_cache: PagedKVCache,
        logits_indices: torch.Tensor,
        load_hook: LoadHook | None = None,
    ) -> torch.Tensor:
        """Run T flat tokens; return fp32 logits [len(logits_indices), V].

        ``meta`` may be a list, one :class:`AttentionMetadata` per micro-batch: consecutive
        token ranges of the flat batch (each as long as its ``slot_mapping``), run in
        ping-pong (:meth:`_layers`).
        """
        assert self.experts is not None, "set model.experts before running the model"
        c = self.config
        h = self.model.embed_tokens(input_ids)
        cos, sin = rotary_cos_sin(positions, c.rotary_dim, c.rope_theta, h.dtype, c.rope_scaling)
        metas = [meta] if isinstance(meta, AttentionMetadata) else list(meta)
        h = self._layers(h, cos, sin, metas, kv_cache, load_hook)
        h = self.model.norm(h[logits_indices])
        return self.lm_head(h).float()

    def _layers(
        self,
        h: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        metas: list[AttentionMetadata],
        kv_cache: PagedKVCache,
        load_hook: LoadHook | None,
    ) -> torch.Tensor:
        """All layers over the step's micro-batches (one, or two in ping-pong: dual-batch
        overlap); h: [T, H].

        Per MoE layer i: A's attention and gate, submit A's routed experts, A's shared
        experts; then B's attention (its layer i-1 experts waited for first), gate, submit,
        shared; A waits for its layer i only when it starts layer i + 1. So while one
        micro-batch's rows are at the expert workers, the engine computes the other's.
        Every row sees the same operations as in the one-batch loop; results differ only by
        rounding where a kernel's path depends on the batch shape (e.g. CPU GEMMs over one
        or two rows, the expert kernel's bmm/grouped_mm choice): ~1e-7 on the logits here,
        greedy tokens the same in the tests.

        A micro-batch's attention only reads K/V of its own sequences, written by the same
        layer earlier, or of a prefix-cache block another request allocated in this step:
        the scheduler lists that request first, so it is in the same or an earlier
        micro-batch, whose layer i has written the block before this one's layer i reads it.
        """
        experts = self.experts
        assert experts is not None
        if len(metas) == 1:
            hs, coss, sins, offsets = [h], [cos], [sin], [0]
        else:
            sizes = [int(m.slot_mapping.shape[0]) for m in metas]
            offsets = [sum(sizes[:j]) for j in range(len(sizes))]
            hs = list(h.split(sizes))
            coss, sins = cos.split(sizes), sin.split(sizes)
        # per micro-batch: (its MoE layer at the backend, the residual to add), or None
        pending: list[tuple[SparseMoE, PendingMoE, torch.Tensor] | None] = [None] * len(metas)
        for i, layer in enumerate(self.model.layers):
            for j, m in enumerate(metas):
                x = hs[j]
                if pending[j] is not None:
                    moe, handle, residual = pending[j]  # type: ignore[misc]
                    x = residual + moe.finish(experts, handle)
                    pending[j] = None
                residual = x
                x = layer.input_layernorm(x)
                x = residual + layer.self_attn(x, coss[j], sins[j], kv_cache.layers[i], m)
                residual = x
                x = layer.post_attention_layernorm(x)
                if layer.is_moe:
                    handle = layer.mlp.start(
                        x, experts, load_hook, m.num_padding_tokens, offsets[j]
                    )
                    pending[j] = (layer.mlp, handle, residual)
                else:
                    hs[j] = residual + layer.mlp(x)
        for j, p in enumerate(pending):
            if p is not None:
                moe, handle, residual = p
                hs[j] = residual + moe.finish(experts, handle)
        return hs[0] if len(hs) == 1 else torch.cat(hs)

    def checkpoint_name(self, param_name: str) -> str:
        """The checkpoint tensor holding a parameter of this module."""
        if self.config.model_type == "mixtral":
            return param_name.replace(".mlp.gate.", ".block_sparse_moe.gate.")
        if self.config.model_type == "gpt_oss":
            return param_name.replace(".mlp.gate.", ".mlp.router.")
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
        for name, buf in list(self.named_buffers()):
            module_name, _, attr = name.rpartition(".")
            if attr in FP32_BUFFERS:
                value = reader.get(
                    self.checkpoint_name(name), tuple(buf.shape), torch.float32, buf.device
                )
                self.get_submodule(module_name).register_buffer(attr, value)

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
        if config.scoring_func == "sigmoid":
            # the sigmoid router runs in fp32 (as transformers computes it): keep its weight
            # in fp32 rather than casting it up at every layer of every step
            for module in model.modules():
                if isinstance(module, SparseMoE):
                    module.gate.float()
        model.load_weights(reader)
        for module in model.modules():
            if isinstance(module, Attention):
                module.fuse_projections()
        widen_linears(model)  # bf16 on a CPU without bf16 dot products: fp32 matmuls
        model.eval()
        return model
