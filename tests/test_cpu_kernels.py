"""elasticmoe's CPU kernels (elasticmoe/model/kernels): the packed expert kernel gives the
torch path's results, bit for bit, wherever it runs; decode attention is as close to an fp32
reference as the torch path; the torch path runs wherever they do not apply, with bf16
experts widened to fp32 on CPUs without bf16 dot products."""

from __future__ import annotations

import os
import shutil
from dataclasses import replace

import pytest
import torch

from elasticmoe.core.experts import LogicalExpert
from elasticmoe.experts.local import LocalExperts
from elasticmoe.experts.service import LayerStack
from elasticmoe.experts.weights import ExpertWeights
from elasticmoe.model import kernels
from elasticmoe.model.config import SILU
from elasticmoe.model.gate import topk_softmax_gate
from elasticmoe.model.moe import fused_expert_pairs, fused_experts


@pytest.fixture
def needs_kernel():
    """Built on first use (here under the test's ELASTICMOE_HOME, not at collection).

    Skipped where the kernel does not apply (switched off, a CPU it does not support, no
    C++ compiler); a build that fails on a machine with a compiler fails these tests
    instead of skipping them.
    """
    if kernels.cpu_ops() is not None:
        return
    if kernels.build_error is not None and shutil.which(os.environ.get("CXX", "c++")):
        pytest.fail(f"the CPU kernel failed to build: {kernels.build_error}")
    pytest.skip(
        "the CPU kernel is off here (neither AMX nor AVX512-BF16, no C++ compiler, or "
        f"{kernels.ENABLE_VAR}=0); the torch path runs and the other tests cover it"
    )


E, H, INTER = 8, 64, 96  # multiples of the kernel's 32-column blocks
BF16 = torch.bfloat16


def _stacked(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    w13 = (torch.randn(E, 2 * INTER, H, generator=g) * 0.1).to(BF16)
    w2 = (torch.randn(E, H, INTER, generator=g) * 0.1).to(BF16)
    # the layout LocalExperts keeps on CPU: transposed views of row-major buffers
    return w13.transpose(1, 2).contiguous().transpose(1, 2), w2.transpose(
        1, 2
    ).contiguous().transpose(1, 2)


def _gate(x: torch.Tensor, top_k: int, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(x.shape[0], E, generator=g)
    return topk_softmax_gate(logits, top_k, True, BF16)


@pytest.mark.usefixtures("needs_kernel")
@pytest.mark.parametrize("top_k", [1, 2, 4])
@pytest.mark.parametrize("tokens", [0, 1, 5, 17, 64, 300])
def test_kernel_matches_the_torch_path_bit_for_bit(tokens, top_k):
    w13, w2 = _stacked()
    packed = kernels.pack_experts(w13, w2, None, None, "silu")
    assert packed is not None
    x = (torch.randn(tokens, H, generator=torch.Generator().manual_seed(2)) * 2).to(BF16)
    gate = _gate(x, top_k)
    want = fused_experts(x, gate, w13, w2)
    got = fused_experts(x, gate, w13, w2, packed=packed)
    assert got.dtype == BF16 and got.shape == (tokens, H)
    assert torch.equal(got, want)


@pytest.mark.usefixtures("needs_kernel")
def test_kernel_matches_a_workers_share_of_pairs():
    """Any (row, expert, weight) pairs, summed as one index_add_ sums them (in fp32)."""
    w13, w2 = _stacked(3)
    packed = kernels.pack_experts(w13, w2, None, None, "silu")
    g = torch.Generator().manual_seed(4)
    x = torch.randn(40, H, generator=g).to(BF16)
    # unique (row, expert) pairs, rows with 0..E pairs, in no particular order
    pairs = torch.randperm(40 * E, generator=g)[:150]
    rows, experts = pairs // E, pairs % E
    weights = torch.rand(150, generator=g).to(BF16)
    want = fused_expert_pairs(x, rows, experts, weights, w13, w2)
    got = fused_expert_pairs(x, rows, experts, weights, w13, w2, packed=packed)
    assert torch.equal(got, want)
    assert (got[torch.isin(torch.arange(40), rows, invert=True)] == 0).all()


@pytest.mark.usefixtures("needs_kernel")
def test_local_experts_and_a_worker_stack_use_the_kernel():
    w13, w2 = _stacked(5)
    experts = {LogicalExpert(0, e): ExpertWeights(w13[e], w2[e]) for e in range(E)}
    local = LocalExperts(experts)
    assert local.stacked[0][5] is not None
    x = torch.randn(32, H, generator=torch.Generator().manual_seed(6)).to(BF16)
    gate = _gate(x, 2)
    assert torch.equal(local.forward(0, x, gate), fused_experts(x, gate, w13, w2))
    stack = LayerStack.of(
        list(range(E)), [experts[LogicalExpert(0, e)] for e in range(E)], E, "cpu"
    )
    assert stack.packed is not None


def test_the_kernel_applies_only_where_its_arithmetic_is_the_torch_paths():
    w13, w2 = _stacked()
    b13, b2 = torch.zeros(E, 2 * INTER, dtype=BF16), torch.zeros(E, H, dtype=BF16)
    assert kernels.pack_experts(w13.float(), w2.float(), None, None, "silu") is None
    assert kernels.pack_experts(w13, w2, b13, b2, "silu") is None
    odd13, odd2 = w13[:, : 2 * 40, :40], w2[:, :40, :40]  # sizes not multiples of 32
    assert kernels.pack_experts(odd13, odd2, None, None, "silu") is None
    assert kernels.pack_experts(w13, w2, None, None, "clamped_swiglu") is None


@pytest.mark.usefixtures("needs_kernel")
def test_fp32_gate_weights_keep_the_torch_paths_arithmetic():
    """The torch path multiplies bf16 outputs by fp32 weights in fp32; so must any call."""
    w13, w2 = _stacked()
    packed = kernels.pack_experts(w13, w2, None, None, "silu")
    x = torch.randn(8, H).to(BF16)
    gate = _gate(x, 2)
    gate32 = replace(gate, weights=gate.weights.float())
    want = fused_experts(x, gate32, w13, w2)
    assert torch.equal(fused_experts(x, gate32, w13, w2, packed=packed), want)


@pytest.fixture
def without_bf16_dot_products(monkeypatch):
    """As on a CPU without AMX or AVX512-BF16 (an AVX2 EPYC, say), whatever this one has."""
    monkeypatch.setattr(kernels, "native_bf16_matmul", lambda: False)
    monkeypatch.delenv(kernels.ENABLE_VAR, raising=False)


def _one_bf16_step_apart(got: torch.Tensor, want: torch.Tensor) -> None:
    """Within a bf16 rounding step of the output's scale (fp32 sums in another order may
    round an intermediate across a bf16 boundary), and mostly equal."""
    if not want.numel():
        assert got.shape == want.shape
        return
    diff = (got.float() - want.float()).abs()
    assert diff.max() <= 2 * torch.finfo(BF16).eps * want.float().abs().max()
    assert diff.gt(0).float().mean() < 0.05


@pytest.mark.usefixtures("without_bf16_dot_products")
@pytest.mark.parametrize("tokens", [0, 1, 5, 17, 64, 300])
def test_widened_experts_multiply_in_fp32_and_round_as_bf16_matmuls_do(tokens):
    """Without bf16 dot products the bf16 experts run as fp32 matmuls over fp32 copies,
    each result rounded to bf16: the bf16 path's values (both accumulate in fp32), through
    both the padded bmm and the grouped path (1 token: fewer pairs than experts)."""
    w13, w2 = _stacked(7)
    wide = kernels.widen_experts(w13, w2)
    assert wide is not None and wide.fp32
    assert wide.w13.dtype == torch.float32 and wide.w13.stride() == w13.stride()
    assert torch.equal(wide.w13, w13.float()) and torch.equal(wide.w2, w2.float())
    x = (torch.randn(tokens, H, generator=torch.Generator().manual_seed(8)) * 2).to(BF16)
    gate = _gate(x, 2)
    got = fused_experts(x, gate, w13, w2, packed=wide)
    assert got.dtype == BF16 and got.shape == (tokens, H)
    _one_bf16_step_apart(got, fused_experts(x, gate, w13, w2))
    rows = torch.arange(tokens).repeat_interleave(2)
    experts, weights = gate.indices.flatten(), gate.weights.flatten()
    _one_bf16_step_apart(
        fused_expert_pairs(x, rows, experts, weights, w13, w2, packed=wide),
        fused_expert_pairs(x, rows, experts, weights, w13, w2),
    )


@pytest.mark.usefixtures("without_bf16_dot_products")
def test_local_experts_and_a_worker_stack_widen_where_the_kernel_does_not_apply():
    b13 = torch.randn(E, 2 * INTER).to(BF16)
    b2 = torch.randn(E, H).to(BF16)
    w13, w2 = _stacked(9)
    experts = {LogicalExpert(0, e): ExpertWeights(w13[e], w2[e], b13[e], b2[e]) for e in range(E)}
    local = LocalExperts(experts)
    wide = local.stacked[0][5]
    assert wide is not None and wide.fp32  # biases: never the kernel, but widened
    x = torch.randn(32, H, generator=torch.Generator().manual_seed(10)).to(BF16)
    gate = _gate(x, 2)
    _one_bf16_step_apart(local.forward(0, x, gate), fused_experts(x, gate, w13, w2, b13, b2))
    stack = LayerStack.of(
        list(range(E)), [experts[LogicalExpert(0, e)] for e in range(E)], E, "cpu"
    )
    assert stack.packed is not None and stack.packed.fp32


def test_widening_is_only_for_bf16_on_cpus_without_bf16_dot_products(monkeypatch):
    w13, w2 = _stacked()
    monkeypatch.setattr(kernels, "native_bf16_matmul", lambda: True)
    assert kernels.widen_experts(w13, w2) is None  # oneDNN's bf16 matmuls are fast there
    monkeypatch.setattr(kernels, "native_bf16_matmul", lambda: False)
    assert kernels.widen_experts(w13.float(), w2.float()) is None
    monkeypatch.setenv(kernels.ENABLE_VAR, "0")
    assert kernels.widen_experts(w13, w2) is None


@pytest.mark.usefixtures("without_bf16_dot_products")
def test_widened_linears_multiply_in_fp32_and_round_once():
    g = torch.Generator().manual_seed(11)
    model = torch.nn.Sequential(torch.nn.Linear(H, 96), torch.nn.Linear(96, 40, bias=False))
    model = model.to(BF16)
    x = torch.randn(17, H, generator=g).to(BF16)
    with torch.no_grad():
        want = model(x)
        assert kernels.widen_linears(model) == 2
        assert kernels.widen_linears(model) == 0  # already switched
        first = model[0].forward
        assert first.wide is None  # fp32 copies on first call only
        got = model(x)
        assert first.wide[0].dtype == torch.float32 and torch.equal(
            first.wide[0], model[0].weight.float()
        )
        assert got.dtype == BF16
        one = torch.nn.functional.linear(x.float(), model[0].weight.float(), model[0].bias.float())
        assert torch.equal(model[0](x), one.to(BF16))
        _one_bf16_step_apart(got, want)


def test_linears_stay_plain_with_bf16_dot_products(monkeypatch):
    monkeypatch.setattr(kernels, "native_bf16_matmul", lambda: True)
    assert kernels.widen_linears(torch.nn.Linear(4, 4).to(BF16)) == 0


@pytest.mark.skipif(
    os.environ.get(kernels.ENABLE_VAR, "1") == "0"
    or not shutil.which(os.environ.get("CXX", "c++")),
    reason="the kernel is switched off, or there is no C++ compiler",
)
def test_the_kernel_runs_on_every_cpu_with_bf16_dot_products():
    """A CPU with AMX or AVX512-BF16 gets the kernel (the brgemm or the kernel's own
    micro-kernel); it was once silently off on AVX512-BF16 CPUs without AMX."""
    flags = kernels.cpu_flags()
    if not flags & {"amx_bf16", "avx512_bf16"}:
        pytest.skip("this CPU has neither AMX nor AVX512-BF16")
    ops = kernels.cpu_ops()
    assert ops is not None, kernels.build_error
    assert ops.backend() == ("brgemm" if "amx_bf16" in flags else "avx512_bf16")


def test_the_kernel_can_be_switched_off(monkeypatch):
    monkeypatch.setenv(kernels.ENABLE_VAR, "0")
    monkeypatch.setattr(kernels, "_tried", False)
    monkeypatch.setattr(kernels, "_ops", None)
    assert kernels.cpu_ops() is None
    w13, w2 = _stacked()
    assert kernels.pack_experts(w13, w2, None, None, "silu") is None
    assert SILU.name == "silu"  # the name pack_experts compares with is the model's own


@pytest.mark.usefixtures("needs_kernel")
@pytest.mark.timeout(120)
def test_a_build_killed_midway_does_not_block_later_loads(monkeypatch):
    """torch's lock file, left behind by a killed build, would make every later load wait
    forever; under elasticmoe's flock it is known to be a leftover and removed."""
    (kernels.build_directory() / "lock").write_text("")
    monkeypatch.setattr(kernels, "_tried", False)
    monkeypatch.setattr(kernels, "_ops", None)
    assert kernels.cpu_ops() is not None
    assert not (kernels.build_directory() / "lock").exists()


# ------------------------------------------------------------------ decode attention
def _paged_case(batch, max_len, heads, kv_heads, head_dim, block_size=16, seed=0):
    """Random bf16 caches, block tables over shuffled blocks (block 0 unused, as the
    engine's scratch block), lengths up to ``max_len`` (the first exactly ``max_len``)."""
    g = torch.Generator().manual_seed(seed)
    lens = torch.randint(1, max_len + 1, (batch,), generator=g)
    lens[0] = max_len
    nblocks = (lens + block_size - 1) // block_size
    num = 1 + int(nblocks.sum())
    kc = torch.randn(num, block_size, kv_heads, head_dim, generator=g).to(BF16)
    vc = torch.randn(num, block_size, kv_heads, head_dim, generator=g).to(BF16)
    tables = torch.zeros(batch, int(nblocks.max()), dtype=torch.long)
    perm, used = torch.randperm(num - 1, generator=g) + 1, 0
    for b in range(batch):
        tables[b, : nblocks[b]] = perm[used : used + nblocks[b]]
        used += int(nblocks[b])
    q = torch.randn(batch, heads, head_dim, generator=g).to(BF16)
    return q, kc, vc, lens - 1, tables


def _reference_attention(q, kc, vc, positions, tables, scale, window):
    """fp32 attention of each query to keys max(0, pos - window + 1)..pos, in plain torch."""
    batch, heads, dim = q.shape
    bs, kv_heads = kc.shape[1], kc.shape[2]
    out = torch.empty(batch, heads, dim)
    for b in range(batch):
        pos = int(positions[b])
        idx = torch.arange(max(0, pos - window + 1) if window else 0, pos + 1)
        rows = tables[b, idx // bs] * bs + idx % bs
        keys = kc.reshape(-1, kv_heads, dim)[rows].float()
        values = vc.reshape(-1, kv_heads, dim)[rows].float()
        for h in range(heads):
            kv = h // (heads // kv_heads)
            probs = torch.softmax(keys[:, kv] @ q[b, h].float() * scale, 0)
            out[b, h] = probs @ values[:, kv]
    return out


def _via_attend_paged(q, kc, vc, positions, tables, scale, window):
    """The same rows through the engine's _attend_paged (the kernel unless patched out)."""
    from elasticmoe.model.attention import AttentionGroup, AttentionMetadata, _attend_paged

    batch = q.shape[0]
    group = AttentionGroup(
        token_idx=torch.arange(batch).view(batch, 1),
        positions=positions.view(batch, 1),
        block_tables=tables,
        q_valid=None,
    )
    meta = AttentionMetadata(slot_mapping=torch.zeros(batch, dtype=torch.long), groups=[group])
    return _attend_paged(q, kc, vc, meta, scale, window)


@pytest.mark.usefixtures("needs_kernel")
@pytest.mark.parametrize(
    ("heads", "kv_heads", "head_dim", "max_len", "window"),
    [
        (8, 4, 32, 128, None),  # the issue-13 Mixtral's shapes
        (8, 8, 64, 70, None),  # no GQA, partial last block
        (16, 2, 32, 300, None),  # 8 query heads per KV head, long contexts
        (8, 4, 32, 128, 40),  # sliding window
        (4, 1, 16, 1, None),  # one key each
    ],
)
def test_decode_attention_is_as_close_to_fp32_as_the_torch_path(
    monkeypatch, heads, kv_heads, head_dim, max_len, window
):
    """Not bit-equal (SDPA's bf16 kernel rounds its probabilities to bf16; the kernel keeps
    them in fp32): each result within a bf16 rounding of the fp32 reference, and no
    further from it than the torch path is, beyond one bf16 step."""
    q, kc, vc, positions, tables = _paged_case(24, max_len, heads, kv_heads, head_dim)
    scale = head_dim**-0.5
    want = _reference_attention(q, kc, vc, positions, tables, scale, window)
    got = kernels.decode_attention(q, kc, vc, positions, tables, scale, window)
    assert got is not None and got.dtype == BF16 and got.shape == q.shape
    monkeypatch.setattr(kernels, "decode_attention", lambda *args: None)
    torch_path = _via_attend_paged(q, kc, vc, positions, tables, scale, window)
    err = (got.float() - want).abs()
    torch_err = (torch_path.float() - want).abs()
    step = want.abs().clamp_min(2**-8) * 2**-7  # one bf16 step at each value
    assert bool((err <= step).all())
    assert float(err.max()) <= float(torch_err.max()) + float(step.max())


@pytest.mark.usefixtures("needs_kernel")
def test_paged_attention_runs_decode_groups_on_the_kernel_and_the_rest_on_torch():
    """paged_attention's decode group goes through the kernel (bf16), fp32 does not."""
    q, kc, vc, positions, tables = _paged_case(6, 40, 8, 4, 32)
    scale = 32**-0.5
    via_kernel = kernels.decode_attention(q, kc, vc, positions, tables, scale, None)
    assert torch.equal(_via_attend_paged(q, kc, vc, positions, tables, scale, None), via_kernel)
    int32 = kernels.decode_attention(q, kc, vc, positions.int(), tables.int(), scale, None)
    assert torch.equal(int32, via_kernel)
    assert (
        kernels.decode_attention(q.float(), kc.float(), vc.float(), positions, tables, scale, None)
        is None
    )


@pytest.mark.usefixtures("needs_kernel")
def test_decode_attention_refuses_positions_past_the_block_table():
    q, kc, vc, positions, tables = _paged_case(2, 20, 8, 4, 32)
    positions = positions.clone()
    positions[1] = tables.shape[1] * kc.shape[1]  # one past the last slot the table maps
    with pytest.raises(RuntimeError, match="past the block table"):
        kernels.decode_attention(q, kc, vc, positions, tables, 1.0, None)
    tables = tables.clone()
    tables[0, 0] = kc.shape[0]
    with pytest.raises(RuntimeError, match="block id out of range"):
        kernels.decode_attention(q, kc, vc, positions.clamp_max(0), tables, 1.0, None)
