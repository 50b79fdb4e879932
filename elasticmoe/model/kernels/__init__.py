"""elasticmoe's own CPU kernels (C++ beside this file), built on first use.

``cpu_moe.cpp`` runs a layer's routed experts (bf16, SiLU, no biases) as micro-kernels
(oneDNN's brgemm with AMX, its own ``vdpbf16ps`` loop with AVX512-BF16 alone) over
weights packed once at load, with the same roundings as
:func:`elasticmoe.model.moe.fused_experts`. ``torch.bmm`` over the stacked weights repacks
every expert's weights on every call, which is most of its time at decode batch sizes.

``cpu_attention.cpp`` attends decode queries (bf16) to the paged K/V cache in place
through the block tables, in fp32, instead of gathering every sequence's blocks and calling
SDPA, whose bf16 kernel is slow on CPUs without AMX. Not bit-equal to SDPA (which rounds
its probabilities to bf16), and at least as close to an fp32 reference.

The extension is compiled with ``torch.utils.cpp_extension`` (a C++ compiler and ninja)
into ``$ELASTICMOE_HOME/kernels`` the first time a bf16 model is loaded on a CPU with AMX
or AVX512-BF16, then reused. Where it cannot be built or used, or
``ELASTICMOE_CPU_KERNELS=0``, the torch path runs instead: the experts' results are the
same, only slower; attention's differ by bf16 rounding.

On a CPU without bf16 dot products (neither AMX nor AVX512-BF16: AVX2, say) torch's bf16
matmuls convert in software, about 1 GFLOP/s. There :func:`widen_experts` and
:func:`widen_linears` give a bf16 model's experts and linear layers fp32 copies of their
weights: the matmuls run in fp32 and round their results to bf16, as bf16 matmuls round
their fp32 accumulators.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import hashlib
import logging
import os
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from unittest import mock

import torch

logger = logging.getLogger(__name__)

ENABLE_VAR = "ELASTICMOE_CPU_KERNELS"
# One extension (``torch.ops.elasticmoe_cpu``) from these sources.
SOURCES = tuple(Path(__file__).with_name(n) for n in ("cpu_moe.cpp", "cpu_attention.cpp"))
# The column block of the packed weights (BN in cpu_moe.cpp): packed dims must divide by it.
BLOCK_N = 32

_lock = threading.Lock()
_ops: Any = None
_tried = False
# Why the last build failed (None: it did not fail; the kernel may still be off for other
# reasons: switched off, or a CPU it does not support).
build_error: str | None = None


def _build_flags() -> list[str]:
    # at::vec's AVX512 implementations; the matmuls dispatch at run time inside oneDNN.
    return [
        "-O3",
        "-fopenmp",
        "-mavx512f",
        "-mavx512bw",
        "-mavx512vl",
        "-mavx512dq",
        "-mfma",
        "-DCPU_CAPABILITY_AVX512",
        "-DCPU_CAPABILITY=AVX512",
    ]


def build_directory() -> Path:
    """Where this source, torch version and flags are built: ``$ELASTICMOE_HOME/kernels``."""
    from elasticmoe.model.registry import home

    key = b"".join(src.read_bytes() for src in SOURCES)
    key += " ".join([torch.__version__, *_build_flags()]).encode()
    return home() / "kernels" / f"cpu_moe-{hashlib.sha256(key).hexdigest()[:12]}"


def _ninja_on_path() -> Any:
    """PATH with the ``ninja`` package's binary first, for the build only: torch runs
    ``ninja`` from PATH, which need not include the virtualenv's ``bin``."""
    try:
        import ninja

        bin_dir = str(ninja.BIN_DIR)
    except (ImportError, AttributeError):
        return contextlib.nullcontext()
    path = os.pathsep.join([bin_dir, os.environ.get("PATH", "")])
    return mock.patch.dict(os.environ, {"PATH": path})


def _cpu_supported() -> bool:
    return torch.backends.cpu.get_cpu_capability() in ("AVX512", "AMX", "AVX512_BF16")


def cpu_ops() -> Any:
    """``torch.ops.elasticmoe_cpu`` once built and usable here, else None (logged once)."""
    global _ops, _tried, build_error
    if _tried:
        return _ops
    with _lock:
        if _tried:
            return _ops
        _tried = True
        if os.environ.get(ENABLE_VAR, "1") == "0":
            return None
        if not _cpu_supported():
            logger.info("CPU kernels off: this CPU has no AVX512 (torch's path runs)")
            return None
        try:
            from torch.utils.cpp_extension import load

            build_dir = build_directory()
            build_dir.mkdir(parents=True, exist_ok=True)
            # One build at a time across processes (engine, workers). torch's own lock
            # file stays behind when a build is killed, and then makes every later load
            # wait forever; an flock is released with its process, so under it a torch
            # lock file can only be such a leftover.
            with open(build_dir / "build.flock", "w") as held, _ninja_on_path():
                fcntl.flock(held, fcntl.LOCK_EX)
                (build_dir / "lock").unlink(missing_ok=True)
                load(
                    name="elasticmoe_cpu",
                    sources=[str(src) for src in SOURCES],
                    extra_cflags=_build_flags(),
                    build_directory=str(build_dir),
                    is_python_module=False,
                    verbose=False,
                )
            ops = torch.ops.elasticmoe_cpu
            if not ops.backend():  # neither micro-kernel runs on this CPU
                logger.info("CPU kernels off: this CPU has neither AMX nor AVX512-BF16")
                return None
            _ops = ops
        except Exception as exc:  # no compiler, no ninja, a failed build: torch's path runs
            logger.warning("CPU kernels unavailable, using torch's path: %s", exc)
            build_error = str(exc)
            _ops = None
    return _ops


@dataclass(frozen=True)
class PackedExperts:
    """One layer's stacked experts prepared for a faster CPU path: packed for the kernel's
    :func:`moe_pairs` (``w13`` from [E, 2I, H], gate rows then up rows; ``w2`` from
    [E, H, I]), or, ``fp32``, fp32 copies of the bf16 ``w13`` / ``w2`` in their layout
    (:func:`widen_experts`)."""

    w13: torch.Tensor
    w2: torch.Tensor
    fp32: bool = False


def pack_experts(
    w13: torch.Tensor,
    w2: torch.Tensor,
    b13: torch.Tensor | None,
    b2: torch.Tensor | None,
    activation: str,
) -> PackedExperts | None:
    """The layer's experts packed for the CPU kernel, or None where it does not apply
    (another device or dtype, biases, an activation other than SiLU, sizes that are not
    multiples of 32, or no kernel here)."""
    if w13.device.type != "cpu" or w13.dtype != torch.bfloat16 or w2.dtype != torch.bfloat16:
        return None
    if b13 is not None or b2 is not None or activation != "silu":
        return None
    hidden, inter = w2.shape[1], w2.shape[2]
    if hidden % BLOCK_N or inter % BLOCK_N or w13.shape[1] != 2 * inter:
        return None
    ops = cpu_ops()
    if ops is None:
        return None
    with torch.inference_mode():
        return PackedExperts(ops.pack_weight(w13), ops.pack_weight(w2))


def cpu_flags() -> set[str]:
    """The CPU's feature flags (``/proc/cpuinfo``; empty where there is none)."""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return set(line.split(":", 1)[1].split())
    return set()


@functools.cache
def native_bf16_matmul() -> bool:
    """Whether this CPU has bf16 dot products (AMX or AVX512-BF16), which torch's bf16
    matmuls (oneDNN) use; without them those matmuls convert in software."""
    return bool(cpu_flags() & {"amx_bf16", "avx512_bf16"})


def _widening() -> bool:
    """Whether bf16 matmuls multiply in fp32 here (:func:`widen_experts`, :func:`widen_linears`)."""
    return os.environ.get(ENABLE_VAR, "1") != "0" and not native_bf16_matmul()


def widen_experts(w13: torch.Tensor, w2: torch.Tensor) -> PackedExperts | None:
    """fp32 copies of a layer's bf16 stacked experts, for a CPU without bf16 dot products
    (None elsewhere, or with ``ELASTICMOE_CPU_KERNELS=0``).

    There torch's bf16 matmuls run about 1 GFLOP/s, its fp32 ones 15-30x faster (measured
    on an AVX2 EPYC, Mixtral-small experts, 1 to 128 rows), and a layer's experts in bf16
    are most of a decode step. :func:`~elasticmoe.model.moe.fused_experts` then multiplies
    the bf16 rows in fp32 and rounds each matmul's result to bf16, as the bf16 matmul does
    (both accumulate in fp32; only the order of the additions may differ). Costs twice the
    experts' bf16 memory again.
    """
    if w13.device.type != "cpu" or w13.dtype != torch.bfloat16 or w2.dtype != torch.bfloat16:
        return None
    if not _widening():
        return None
    with torch.inference_mode():
        return PackedExperts(_widen(w13), _widen(w2), fp32=True)


def _widen(w: torch.Tensor) -> torch.Tensor:
    """``w`` as fp32 with the same strides (a transposed view stays one)."""
    return torch.empty_strided(w.shape, w.stride(), dtype=torch.float32).copy_(w)


def widen_linears(model: torch.nn.Module) -> int:
    """Make the model's bf16 ``nn.Linear`` layers multiply in fp32 on a CPU without bf16
    dot products (see :func:`widen_experts`); returns how many were switched (0 elsewhere).

    Each switched layer keeps its bf16 parameters (checkpoints, views, accounting) and, on
    its first call, takes fp32 copies of them: a layer never called (``q_proj`` beside the
    fused ``qkv_proj``) costs nothing. A call multiplies the bf16 rows in fp32, adds the
    bias in fp32 and rounds once to bf16, as a bf16 ``F.linear`` does with its fp32
    accumulator.
    """
    if not _widening():
        return 0
    count = 0
    for module in model.modules():
        if not isinstance(module, torch.nn.Linear) or isinstance(module.forward, _WideLinear):
            continue
        if module.weight.device.type == "cpu" and module.weight.dtype == torch.bfloat16:
            module.forward = _WideLinear(module)  # type: ignore[method-assign]
            count += 1
    return count


class _WideLinear:
    """The ``forward`` of one widened ``nn.Linear`` (:func:`widen_linears`)."""

    def __init__(self, linear: torch.nn.Linear) -> None:
        self.linear = linear
        self.wide: tuple[torch.Tensor, torch.Tensor | None] | None = None

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        linear = self.linear
        if x.dtype != torch.bfloat16:
            return torch.nn.functional.linear(x, linear.weight, linear.bias)
        if self.wide is None:
            with torch.no_grad():
                bias = None if linear.bias is None else linear.bias.float()
                self.wide = (linear.weight.float(), bias)
        weight, bias = self.wide
        return torch.nn.functional.linear(x.float(), weight, bias).to(torch.bfloat16)


def moe_pairs(
    hidden: torch.Tensor,
    token_idx: torch.Tensor | None,
    expert_idx: torch.Tensor,
    weights: torch.Tensor,
    packed: PackedExperts,
    fp32_sum: bool,
) -> torch.Tensor:
    """Per token row of ``hidden`` [T, H], the weighted sum over its (row, expert, weight)
    pairs of the packed experts (``token_idx`` None: pairs in the gate's [T, k] layout,
    flattened), added in ascending expert order: rounded to bf16 after each
    add, or (``fp32_sum``) summed in fp32 and rounded once, as ``index_add_`` does. [T, H]."""
    return cpu_ops().moe_pairs(
        hidden, token_idx, expert_idx, weights, packed.w13, packed.w2, fp32_sum
    )


def decode_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    positions: torch.Tensor,
    block_tables: torch.Tensor,
    scale: float,
    sliding_window: int | None,
) -> torch.Tensor | None:
    """One query per sequence (q [B, Hq, D], the query at ``positions`` [B]) attended to its
    cached keys through its block table (caches [N, bs, Hkv, D]): [B, Hq, D], or None where
    the kernel does not apply (another device or dtype, head_dim not a multiple of 16, no
    kernel here)."""
    if q.device.type != "cpu" or q.dtype != torch.bfloat16 or k_cache.dtype != torch.bfloat16:
        return None
    if q.shape[-1] % 16 or not k_cache.is_contiguous() or not v_cache.is_contiguous():
        return None
    ops = cpu_ops()
    if ops is None:
        return None
    return ops.decode_attention(
        q,
        k_cache,
        v_cache,
        positions.to(torch.long),  # no copy when they are int64 already (the engine's)
        block_tables.to(torch.long),
        scale,
        sliding_window or 0,
    )
