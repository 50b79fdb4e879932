"""Tensors on the wire: ``elasticmoe.v1.Tensor`` <-> ``torch.Tensor``.

A tensor travels as its raw little-endian, C-contiguous bytes plus a dtype
name and a shape, so encoding is one memcpy and decoding is a view over the
received bytes. Everything that arrives is validated before it is viewed: a
bad peer or a buggy router gets a :class:`WireError` naming what is wrong,
never a garbage tensor or a crash.
"""

from __future__ import annotations

import math
import re
import sys
import warnings
from collections.abc import Sequence

import numpy as np
import torch

from elasticmoe._proto.elasticmoe.v1 import expert_pb2

__all__ = [
    "DTYPE_TO_NAME",
    "NAME_TO_DTYPE",
    "WireError",
    "dtype_from_name",
    "dtype_name",
    "host_array",
    "tensor_from_proto",
    "tensor_to_proto",
]

# The wire format is little-endian; the raw bytes of a torch tensor are in host
# order, so a big-endian host would need a byte swap that is not implemented.
if sys.byteorder != "little":  # pragma: no cover - no supported platform is big-endian
    raise ImportError("elasticmoe.experts.wire assumes a little-endian host")

NAME_TO_DTYPE: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}
DTYPE_TO_NAME: dict[torch.dtype, str] = {v: k for k, v in NAME_TO_DTYPE.items()}

# torch.frombuffer warns once when it views an immutable ``bytes`` object. The
# read-only views made here are either copied or handed to callers that promise
# not to write (``readonly_ok``), so the warning is noise; the filter is limited
# to calls made from this module.
warnings.filterwarnings(
    "ignore",
    message="The given buffer is not writable",
    category=UserWarning,
    module=re.escape(__name__) + "$",
)


# No tensor of the protocol has more dimensions than this; a shape vector is checked
# against it before any arithmetic on it (a 60,000-entry shape must cost nothing).
MAX_DIMS = 8
# No single tensor is larger than a gRPC message may be.
MAX_ELEMENTS = 1 << 31


class WireError(ValueError):
    """A wire message does not describe a valid tensor (or not the expected one)."""


def dtype_name(dtype: torch.dtype) -> str:
    """Wire name of a torch dtype; raises :class:`WireError` for unsupported ones."""
    try:
        return DTYPE_TO_NAME[dtype]
    except KeyError:
        raise WireError(
            f"dtype {dtype} cannot be sent; supported: {', '.join(NAME_TO_DTYPE)}"
        ) from None


def dtype_from_name(name: str) -> torch.dtype:
    """Torch dtype of a wire dtype name; raises :class:`WireError` for unknown names."""
    try:
        return NAME_TO_DTYPE[name]
    except KeyError:
        raise WireError(
            f"dtype {name!r} is not supported; supported: {', '.join(NAME_TO_DTYPE)}"
        ) from None


def tensor_to_bytes(t: torch.Tensor) -> bytes:
    """Raw C-contiguous bytes of ``t`` (moved to the host if needed)."""
    flat = t.detach().reshape(-1)  # reshape also makes it contiguous
    if flat.device.type != "cpu":
        flat = flat.cpu()
    # Viewing as uint8 covers bfloat16, which numpy has no type for.
    return flat.view(torch.uint8).numpy().tobytes()


def host_array(t: torch.Tensor) -> np.ndarray:
    """A numpy view of ``t``'s elements in host memory, for building frames with numpy's
    cheap small-array ops (about 1 us each, where a torch op costs 2-10 us and may start
    OpenMP threads). 2-byte floats are viewed as ``uint16`` (numpy has no bfloat16): only
    their bytes are moved, never their values. Copies only to make ``t`` contiguous or to
    bring it to the host."""
    t = t.detach()
    if t.device.type != "cpu":
        t = t.cpu()
    if not t.is_contiguous():
        t = t.contiguous()
    if t.element_size() == 2 and t.is_floating_point():
        t = t.view(torch.uint16)
    return t.numpy()


def array_to_proto(a: np.ndarray, dtype: torch.dtype) -> expert_pb2.Tensor:
    """Encode ``a`` (from :func:`host_array` of a ``dtype`` tensor) as an
    ``elasticmoe.v1.Tensor``: the same message :func:`tensor_to_proto` makes."""
    return expert_pb2.Tensor(dtype=dtype_name(dtype), shape=list(a.shape), data=a.tobytes())


def tensor_to_proto(t: torch.Tensor) -> expert_pb2.Tensor:
    """Encode ``t`` as an ``elasticmoe.v1.Tensor`` (dtype name, shape, raw bytes)."""
    return expert_pb2.Tensor(
        dtype=dtype_name(t.dtype), shape=list(t.shape), data=tensor_to_bytes(t)
    )


def bytes_to_tensor(
    data: bytes | bytearray,
    dtype: torch.dtype,
    shape: Sequence[int],
    device: torch.device | str = "cpu",
    readonly_ok: bool = False,
) -> torch.Tensor:
    """View ``data`` as a tensor of ``dtype`` and ``shape`` on ``device``.

    The byte length must already have been checked against ``shape``. A
    ``bytearray`` is handed over: the tensor views it without a copy. Immutable
    ``bytes`` are copied once (writing through a view would corrupt them for
    every other holder) unless ``readonly_ok`` is set and the device is the
    CPU; for other devices the host-to-device copy is the only copy.
    """
    shape = tuple(int(s) for s in shape)
    if len(data) == 0:
        # frombuffer rejects empty buffers; an empty tensor needs no bytes anyway.
        return torch.empty(shape, dtype=dtype, device=device)
    on_cpu = torch.device(device).type == "cpu"
    if isinstance(data, bytes) and on_cpu and not readonly_ok:
        data = bytearray(data)
    view = torch.frombuffer(data, dtype=torch.uint8).view(dtype).view(shape)
    return view if on_cpu else view.to(device)


def tensor_from_proto(
    msg: expert_pb2.Tensor,
    expected_dtype: torch.dtype | None = None,
    expected_shape_suffix: Sequence[int] | None = None,
    device: torch.device | str = "cpu",
    readonly_ok: bool = False,
    what: str = "tensor",
) -> torch.Tensor:
    """Decode and validate an ``elasticmoe.v1.Tensor``.

    Checks that the dtype name is known (and equals ``expected_dtype`` if
    given), that every dimension is non-negative, that the trailing dimensions
    equal ``expected_shape_suffix`` if given, and that the data holds exactly
    ``prod(shape) * itemsize`` bytes. Raises :class:`WireError` naming ``what``
    and the offending field otherwise.

    The result is safe to write to (a private copy) unless ``readonly_ok`` is
    set, in which case a CPU result may be a zero-copy view of ``msg.data``.
    """
    if not msg.dtype:
        raise WireError(f"{what}.dtype is not set (is {what} missing?)")
    dtype = dtype_from_name_for(msg.dtype, what)
    if expected_dtype is not None and dtype != expected_dtype:
        raise WireError(f"{what}.dtype is {msg.dtype!r}, expected {dtype_name(expected_dtype)!r}")
    if len(msg.shape) > MAX_DIMS:
        raise WireError(f"{what}.shape has {len(msg.shape)} dimensions; at most {MAX_DIMS}")
    shape = tuple(msg.shape)
    if any(d < 0 for d in shape):
        raise WireError(f"{what}.shape {list(shape)} has a negative dimension")
    if any(d > MAX_ELEMENTS for d in shape) or math.prod(shape) > MAX_ELEMENTS:
        raise WireError(f"{what}.shape {list(shape)} has more than {MAX_ELEMENTS} elements")
    if expected_shape_suffix is not None:
        suffix = tuple(expected_shape_suffix)
        if len(shape) < len(suffix) or (suffix and shape[-len(suffix) :] != suffix):
            raise WireError(f"{what}.shape {list(shape)} must end with {list(suffix)}")
    itemsize = torch.empty((), dtype=dtype).element_size()
    expected_bytes = math.prod(shape) * itemsize
    data = msg.data
    if len(data) != expected_bytes:
        raise WireError(
            f"{what}.data has {len(data)} bytes, but shape {list(shape)} of {msg.dtype} "
            f"needs {expected_bytes}"
        )
    return bytes_to_tensor(data, dtype, shape, device=device, readonly_ok=readonly_ok)


def dtype_from_name_for(name: str, what: str) -> torch.dtype:
    """Like :func:`dtype_from_name`, with the message naming the field ``what``."""
    try:
        return dtype_from_name(name)
    except WireError as e:
        raise WireError(f"{what}.dtype: {e}") from None
