"""A trainable MoE decoder whose parameter names are the Hugging Face checkpoint names.

The serving model (:class:`elasticmoe.model.model.MoEForCausalLM`) is inference-only: its
forward runs under ``torch.inference_mode`` over a paged KV cache, and its routed experts are
not parameters (they live in an expert backend, possibly on other machines). Training needs
autograd, dense causal attention over fixed-length blocks and the experts as parameters, so
this module adds a training forward while reusing the serving model's building blocks
(:class:`Attention` projections and q/k norms, :class:`RMSNorm`, RoPE, :class:`DenseMLP`) and
the same gate math. ``state_dict()`` keys are exactly the tensor names of a Hugging Face
checkpoint of the family, so export is a plain ``save_file`` and fine-tuning loads any
checkpoint elasticmoe can serve.

Training our own module rather than ``transformers``' keeps ``elasticmoe train`` free of the
transformers dependency (a dev extra here) and of its fused-expert weight conversions; the
tests check that this forward's loss and auxiliary loss equal transformers' for every family.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from elasticmoe.model.checkpoint import CheckpointReader
from elasticmoe.model.config import MoEModelConfig
from elasticmoe.model.gate import topk_softmax_gate
from elasticmoe.model.model import Attention, DenseMLP, RMSNorm
from elasticmoe.model.rope import apply_rotary, rotary_cos_sin

__all__ = ["CausalLMOutput", "TrainableMoE", "load_balancing_loss"]


@dataclass
class CausalLMOutput:
    """Losses of one training forward.

    loss: cross entropy + ``router_aux_loss_coef`` * aux_loss (what is optimised).
    lm_loss: next-token cross entropy alone (what is reported as the eval loss).
    aux_loss: Switch-style load-balancing loss (0 for a model without MoE layers).
    tokens_per_expert: [num_moe_layers, E] (token, slot) pairs routed to each expert.
    """

    loss: torch.Tensor
    lm_loss: torch.Tensor
    aux_loss: torch.Tensor
    tokens_per_expert: torch.Tensor


def load_balancing_loss(router_logits: list[torch.Tensor], top_k: int) -> torch.Tensor:
    """Switch Transformer load-balancing loss, as transformers computes it for MoE families.

    ``router_logits`` holds one [N, E] tensor per MoE layer. With ``f_e`` the fraction of
    (token, slot) assignments over all layers that went to expert e (summing to ``top_k``) and
    ``P_e`` the mean router probability of e, the loss is ``E * sum_e f_e * P_e``; it is
    ``top_k`` when routing is uniform and grows as load concentrates.
    """
    num_experts = router_logits[0].shape[-1]
    probs = torch.softmax(torch.cat(router_logits).float(), dim=-1)  # [L*N, E]
    _, selected = torch.topk(probs, top_k, dim=-1)
    counts = torch.zeros(num_experts, device=probs.device).scatter_add_(
        0, selected.flatten(), torch.ones(selected.numel(), device=probs.device)
    )
    tokens_per_expert = counts / probs.shape[0]
    router_prob_per_expert = probs.mean(dim=0)
    return num_experts * torch.sum(tokens_per_expert * router_prob_per_expert)


class Expert(nn.Module):
    """One routed expert (SwiGLU) with the family's checkpoint names."""

    def __init__(self, hidden: int, intermediate: int, mixtral_names: bool) -> None:
        super().__init__()
        # mixtral: w1 = gate, w3 = up, w2 = down; the others: gate_proj/up_proj/down_proj
        self.names = ("w1", "w3", "w2") if mixtral_names else ("gate_proj", "up_proj", "down_proj")
        gate, up, down = self.names
        setattr(self, gate, nn.Linear(hidden, intermediate, bias=False))
        setattr(self, up, nn.Linear(hidden, intermediate, bias=False))
        setattr(self, down, nn.Linear(intermediate, hidden, bias=False))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up, down = (getattr(self, n) for n in self.names)
        return down(F.silu(gate(x)) * up(x))


class TrainableSparseMoE(nn.Module):
    """Gate + routed experts (+ qwen2_moe's gated shared expert) as trainable parameters."""

    def __init__(self, config: MoEModelConfig) -> None:
        super().__init__()
        c = config
        self.config = c
        self.gate = nn.Linear(c.hidden_size, c.num_experts, bias=False)
        self.experts = nn.ModuleList(
            Expert(c.hidden_size, c.expert_intermediate_size, c.model_type == "mixtral")
            for _ in range(c.num_experts)
        )
        if c.has_shared_expert:
            self.shared_expert = DenseMLP(c.hidden_size, c.shared_expert_intermediate_size)
            self.shared_expert_gate = nn.Linear(c.hidden_size, 1, bias=False)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x [N, H] -> (out [N, H], router logits [N, E], tokens per expert [E])."""
        c = self.config
        logits = self.gate(x)
        # the serving gate (plain torch ops, so differentiable)
        gate = topk_softmax_gate(logits, c.top_k, c.norm_topk_prob, x.dtype)
        weights, indices, tokens = gate.weights, gate.indices, gate.tokens_per_expert
        out = torch.zeros_like(x)
        for e, expert in enumerate(self.experts):
            rows, slot = torch.where(indices == e)
            if rows.numel() == 0:
                continue
            out = out.index_add(0, rows, expert(x[rows]) * weights[rows, slot, None])
        if c.has_shared_expert:
            out = out + torch.sigmoid(self.shared_expert_gate(x)) * self.shared_expert(x)
        return out, logits, tokens


def _attention(
    attn: Attention, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
) -> torch.Tensor:
    """Causal self-attention over whole blocks x [B, T, H] with the serving module's weights."""
    c = attn.config
    b, t, _ = x.shape
    q, k, v = attn.q_proj(x), attn.k_proj(x), attn.v_proj(x)
    if c.qk_norm == "full":
        q, k = attn.q_norm(q), attn.k_norm(k)
    if c.clip_qkv is not None:
        q, k, v = (z.clamp(-c.clip_qkv, c.clip_qkv) for z in (q, k, v))
    q = q.view(b, t, c.num_heads, c.head_dim)
    k = k.view(b, t, c.num_kv_heads, c.head_dim)
    v = v.view(b, t, c.num_kv_heads, c.head_dim)
    if c.qk_norm == "per_head":
        q, k = attn.q_norm(q), attn.k_norm(k)
    q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
    q, k, v = (z.transpose(1, 2) for z in (q, k, v))  # [B, heads, T, D]
    if c.sliding_window is not None and c.sliding_window < t:
        pos = torch.arange(t, device=x.device)
        mask = (pos[None, :] <= pos[:, None]) & (pos[None, :] > pos[:, None] - c.sliding_window)
        out = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, scale=attn.scale, enable_gqa=True
        )
    else:
        out = F.scaled_dot_product_attention(
            q, k, v, is_causal=True, scale=attn.scale, enable_gqa=True
        )
    return attn.o_proj(out.transpose(1, 2).reshape(b, t, c.num_heads * c.head_dim))


class TrainableDecoderLayer(nn.Module):
    """Pre-norm attention + MoE/dense MLP; the MoE block sits where the family's checkpoint
    puts it (``block_sparse_moe`` for mixtral, ``mlp`` otherwise)."""

    def __init__(self, config: MoEModelConfig, layer: int) -> None:
        super().__init__()
        self.self_attn = Attention(config)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.is_moe = config.is_moe_layer(layer)
        self.mlp_name = "block_sparse_moe" if config.model_type == "mixtral" else "mlp"
        mlp: nn.Module = (
            TrainableSparseMoE(config)
            if self.is_moe
            else DenseMLP(config.hidden_size, config.intermediate_size)
        )
        setattr(self, self.mlp_name, mlp)


class _Backbone(nn.Module):
    def __init__(self, config: MoEModelConfig) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(
            TrainableDecoderLayer(config, i) for i in range(config.num_layers)
        )
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)


class TrainableMoE(nn.Module):
    """MoE decoder for training; ``state_dict()`` names match the family's HF checkpoints."""

    def __init__(self, config: MoEModelConfig, aux_loss_coef: float = 0.0) -> None:
        super().__init__()
        self.config = config
        self.aux_loss_coef = aux_loss_coef
        self.model = _Backbone(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def init_weights(self, std: float, seed: int) -> None:
        """Normal(0, std) for linear/embedding weights, zeros for biases, ones for norms."""
        gen = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for name, param in self.named_parameters():
                if name.endswith("norm.weight"):
                    param.fill_(1.0)
                elif name.endswith(".bias"):
                    param.zero_()
                else:
                    param.copy_(torch.randn(param.shape, generator=gen) * std)

    def load_checkpoint(self, reader: CheckpointReader) -> None:
        """Copy every parameter from a checkpoint (shapes checked; tied head allowed)."""
        with torch.no_grad():
            for name, param in self.named_parameters():
                ckpt_name = name
                if name == "lm_head.weight" and not reader.has(name):
                    ckpt_name = "model.embed_tokens.weight"
                param.copy_(reader.get(ckpt_name, tuple(param.shape), param.dtype))

    def hf_state_dict(self) -> dict[str, torch.Tensor]:
        """Tensors to save, named as in the family's checkpoints (a tied head is omitted)."""
        state = self.state_dict()
        if self.config.tie_word_embeddings:
            state.pop("lm_head.weight", None)
        return state

    def forward(self, input_ids: torch.Tensor) -> CausalLMOutput:
        """input_ids [B, T]: next-token loss over the block (T-1 predictions per row)."""
        c = self.config
        b, t = input_ids.shape
        h = self.model.embed_tokens(input_ids)
        positions = torch.arange(t, device=input_ids.device)
        cos, sin = rotary_cos_sin(positions, c.head_dim, c.rope_theta, h.dtype, c.rope_scaling)
        router_logits: list[torch.Tensor] = []
        tokens: list[torch.Tensor] = []
        for layer in self.model.layers:
            h = h + _attention(layer.self_attn, layer.input_layernorm(h), cos, sin)
            x = layer.post_attention_layernorm(h)
            mlp = getattr(layer, layer.mlp_name)
            if layer.is_moe:
                out, logits, counts = mlp(x.reshape(b * t, -1))
                router_logits.append(logits)
                tokens.append(counts)
                h = h + out.view(b, t, -1)
            else:
                h = h + mlp(x)
        logits = self.lm_head(self.model.norm(h)).float()
        lm_loss = F.cross_entropy(
            logits[:, :-1].reshape(-1, c.vocab_size), input_ids[:, 1:].reshape(-1)
        )
        if router_logits:
            aux = load_balancing_loss(router_logits, c.top_k)
            tokens_per_expert = torch.stack(tokens)
        else:
            aux = torch.zeros((), device=h.device)
            tokens_per_expert = torch.zeros(0, c.num_experts, dtype=torch.long)
        return CausalLMOutput(lm_loss + self.aux_loss_coef * aux, lm_loss, aux, tokens_per_expert)
