"""Read tensors from a Hugging Face checkpoint directory, one tensor at a time.

Expert workers load only the experts they host, so the reader never loads a
whole file: it maps tensor names to files (from ``model.safetensors.index.json``
or from each file's header) and opens tensors lazily. Every error names the
file and the tensor.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Protocol

import torch
from safetensors import SafetensorError, safe_open

from elasticmoe.model.config import MoEModelConfig

INDEX_FILE = "model.safetensors.index.json"


class CheckpointError(ValueError):
    """A checkpoint file is missing, corrupt, or lacks/mismatches a tensor."""


class CheckpointReader:
    """Lazy, name-addressed access to the tensors of a safetensors checkpoint."""

    def __init__(self, model_dir: Path | str) -> None:
        self.model_dir = Path(model_dir)
        self._handles: dict[Path, object] = {}
        self.name_to_file = self._build_index()

    def _build_index(self) -> dict[str, Path]:
        index_path = self.model_dir / INDEX_FILE
        if index_path.is_file():
            try:
                weight_map = json.loads(index_path.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise CheckpointError(f"{index_path}: not a valid safetensors index ({e})") from e
            if not isinstance(weight_map, dict) or not all(
                isinstance(f, str) for f in weight_map.values()
            ):
                raise CheckpointError(f"{index_path}: weight_map must map tensor names to files")
            root = self.model_dir.resolve()
            files = {}
            for name, fname in weight_map.items():
                path = (self.model_dir / fname).resolve()
                # A shard is a file of this directory: an index naming ../x or /etc/x
                # must not make the engine read outside the checkpoint.
                if path.parent != root or not fname.endswith(".safetensors"):
                    raise CheckpointError(
                        f"{index_path}: weight_map[{name!r}] = {fname!r} is not a "
                        f".safetensors file in {self.model_dir}"
                    )
                files[name] = path
            for path in set(files.values()):
                if not path.is_file():
                    raise CheckpointError(f"{index_path}: lists {path.name}, which does not exist")
            return files
        paths = sorted(self.model_dir.glob("*.safetensors"))
        if not paths:
            raise CheckpointError(f"{self.model_dir}: no *.safetensors files")
        files: dict[str, Path] = {}
        for path in paths:
            for name in self._open(path).keys():  # type: ignore[attr-defined]  # noqa: SIM118
                files[name] = path
        return files

    def _open(self, path: Path) -> object:
        handle = self._handles.get(path)
        if handle is None:
            try:
                handle = safe_open(str(path), framework="pt")
            except (SafetensorError, OSError, ValueError) as e:
                raise CheckpointError(f"{path}: cannot read safetensors file ({e})") from e
            self._handles[path] = handle
        return handle

    def has(self, name: str) -> bool:
        """Whether the checkpoint holds a tensor called ``name``."""
        return name in self.name_to_file

    def _file_of(self, name: str) -> Path:
        path = self.name_to_file.get(name)
        if path is None:
            raise CheckpointError(
                f"{self.model_dir}: tensor '{name}' is missing from the checkpoint"
            )
        return path

    def get(
        self,
        name: str,
        shape: tuple[int, ...] | None = None,
        dtype: torch.dtype | None = None,
        device: torch.device | str = "cpu",
    ) -> torch.Tensor:
        """Load one tensor, checking its shape, and cast/move it as asked."""
        path = self._file_of(name)
        try:
            tensor = self._open(path).get_tensor(name)  # type: ignore[attr-defined]
        except (SafetensorError, OSError, ValueError, RuntimeError) as e:
            raise CheckpointError(f"{path}: cannot read tensor '{name}' ({e})") from e
        if shape is not None and tuple(tensor.shape) != tuple(shape):
            raise CheckpointError(
                f"{path}: tensor '{name}' has shape {tuple(tensor.shape)}, expected {tuple(shape)}"
            )
        return tensor.to(device=device, dtype=dtype or tensor.dtype)

    def get_slice(
        self,
        name: str,
        index: int,
        shape: tuple[int, ...] | None = None,
        dtype: torch.dtype | None = None,
        device: torch.device | str = "cpu",
    ) -> torch.Tensor:
        """``tensor[index]`` of a stacked tensor, reading only that slice from the file."""
        path = self._file_of(name)
        try:
            stacked = self._open(path).get_slice(name)  # type: ignore[attr-defined]
            num = stacked.get_shape()[0] if stacked.get_shape() else 0
            if not 0 <= index < num:
                raise CheckpointError(
                    f"{path}: tensor '{name}' has {num} entries along dim 0; asked for {index}"
                )
            tensor = stacked[index]
        except (SafetensorError, OSError, ValueError, RuntimeError) as e:
            if isinstance(e, CheckpointError):
                raise
            raise CheckpointError(f"{path}: cannot read tensor '{name}' ({e})") from e
        if shape is not None and tuple(tensor.shape) != tuple(shape):
            raise CheckpointError(
                f"{path}: tensor '{name}'[{index}] has shape {tuple(tensor.shape)}, "
                f"expected {tuple(shape)}"
            )
        return tensor.to(device=device, dtype=dtype or tensor.dtype)


# ---------------------------------------------------------------------------
# Weight formats: how one expert's slice of a stacked tensor is stored on disk.


class WeightFormat(Protocol):
    """How a stacked expert tensor ``name`` ([E, ...]) is stored in a checkpoint.

    :meth:`read_expert` returns expert ``e``'s slice dense, in the layout the unquantised
    tensor has (``name``[e]), so the code above it never sees the storage format. Today
    every format dequantises at load; a format that keeps its packed form on the device
    (an MXFP4 GPU kernel) would plug in here with its own expert kind.
    """

    name: str

    def matches(self, reader: CheckpointReader, name: str) -> bool:
        """Whether the checkpoint stores ``name`` in this format."""
        ...

    def read_expert(
        self,
        reader: CheckpointReader,
        name: str,
        expert: int,
        dtype: torch.dtype,
        device: torch.device | str = "cpu",
    ) -> torch.Tensor:
        """Expert ``expert``'s slice of ``name``, dense, cast to ``dtype``."""
        ...


class DenseFormat:
    """The tensor is stored as is (float/bf16)."""

    name = "dense"

    def matches(self, reader: CheckpointReader, name: str) -> bool:
        """The tensor itself is in the checkpoint."""
        return reader.has(name)

    def read_expert(
        self,
        reader: CheckpointReader,
        name: str,
        expert: int,
        dtype: torch.dtype,
        device: torch.device | str = "cpu",
    ) -> torch.Tensor:
        """Read ``name``[expert] only."""
        return reader.get_slice(name, expert, dtype=dtype, device=device)


# FP4 e2m1: sign bit, 2 exponent bits, 1 mantissa bit (the OCP MX spec's table).
FP4_VALUES = (
    *(0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0),
    *(-0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0),
)
MXFP4_BLOCK = 32  # values sharing one e8m0 scale


def dequantize_mxfp4(
    blocks: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """MXFP4 -> dense: blocks [..., G, 16] uint8 (two FP4 values a byte, low nibble first),
    scales [..., G] uint8 (e8m0: 2**(s - 127)) -> [..., G * 32]."""
    if blocks.dtype != torch.uint8 or scales.dtype != torch.uint8:
        raise ValueError(
            f"MXFP4 blocks and scales must be uint8, got {blocks.dtype} and {scales.dtype}"
        )
    if blocks.shape[:-1] != scales.shape or blocks.shape[-1] != MXFP4_BLOCK // 2:
        raise ValueError(
            f"MXFP4 blocks {tuple(blocks.shape)} do not match scales {tuple(scales.shape)} "
            f"(expected blocks [..., G, {MXFP4_BLOCK // 2}] and scales [..., G])"
        )
    lut = torch.tensor(FP4_VALUES, dtype=torch.float32, device=blocks.device)
    values = torch.stack([lut[(blocks & 0x0F).long()], lut[(blocks >> 4).long()]], dim=-1)
    values = values.flatten(-2)  # [..., G, 32]
    out = torch.ldexp(values, scales.to(torch.int32)[..., None] - 127)
    return out.flatten(-2).to(dtype)


class Mxfp4Format:
    """``name_blocks`` [E, out, G, 16] + ``name_scales`` [E, out, G] (gpt-oss checkpoints):
    the quantised matrix is [out, in] per expert, the transpose of the dense ``name``[e]."""

    name = "mxfp4"

    def matches(self, reader: CheckpointReader, name: str) -> bool:
        """Both ``_blocks`` and ``_scales`` are in the checkpoint."""
        return reader.has(f"{name}_blocks") and reader.has(f"{name}_scales")

    def read_expert(
        self,
        reader: CheckpointReader,
        name: str,
        expert: int,
        dtype: torch.dtype,
        device: torch.device | str = "cpu",
    ) -> torch.Tensor:
        """Read this expert's blocks and scales only; dequantise on CPU."""
        blocks = reader.get_slice(f"{name}_blocks", expert)
        scales = reader.get_slice(f"{name}_scales", expert)
        try:
            dense = dequantize_mxfp4(blocks, scales, torch.float32)
        except ValueError as e:
            raise CheckpointError(f"{reader.model_dir}: tensor '{name}' ({e})") from None
        return dense.transpose(0, 1).contiguous().to(device=device, dtype=dtype)


# Tried in order; register another (e.g. a kernel-backed one) with register_weight_format.
WEIGHT_FORMATS: list[WeightFormat] = [DenseFormat(), Mxfp4Format()]


def register_weight_format(fmt: WeightFormat) -> None:
    """Add a weight format, tried before the built-in ones."""
    WEIGHT_FORMATS.insert(0, fmt)


def weight_format_for(reader: CheckpointReader, name: str) -> WeightFormat:
    """The format the checkpoint stores stacked tensor ``name`` in."""
    for fmt in WEIGHT_FORMATS:
        if fmt.matches(reader, name):
            return fmt
    raise CheckpointError(
        f"{reader.model_dir}: tensor '{name}' is missing from the checkpoint (looked for "
        f"it as {', '.join(f.name for f in WEIGHT_FORMATS)})"
    )


def read_expert_tensor(
    reader: CheckpointReader,
    name: str,
    expert: int,
    shape: tuple[int, ...],
    dtype: torch.dtype,
    device: torch.device | str = "cpu",
) -> torch.Tensor:
    """Expert ``expert``'s slice of stacked tensor ``name``, in whatever format it is stored,
    checked against ``shape``."""
    tensor = weight_format_for(reader, name).read_expert(reader, name, expert, dtype, device)
    if tuple(tensor.shape) != tuple(shape):
        raise CheckpointError(
            f"{reader.model_dir}: tensor '{name}'[{expert}] has shape {tuple(tensor.shape)}, "
            f"expected {tuple(shape)}"
        )
    return tensor


def stacked_expert_tensor_names(config: MoEModelConfig, layer: int) -> dict[str, str]:
    """gpt_oss: one tensor per layer holds all experts. Keys: gate_up ([E, H, 2I], gate and up
    interleaved along the last dim), gate_up_bias ([E, 2I]), down ([E, I, H]), down_bias
    ([E, H])."""
    prefix = f"model.layers.{layer}.mlp.experts"
    return {
        "gate_up": f"{prefix}.gate_up_proj",
        "gate_up_bias": f"{prefix}.gate_up_proj_bias",
        "down": f"{prefix}.down_proj",
        "down_bias": f"{prefix}.down_proj_bias",
    }


def expert_tensor_names(config: MoEModelConfig, layer: int, expert: int) -> tuple[str, str, str]:
    """Checkpoint names of one logical expert's (gate, up, down) projections."""
    if config.model_type == "mixtral":
        prefix = f"model.layers.{layer}.block_sparse_moe.experts.{expert}"
        return f"{prefix}.w1.weight", f"{prefix}.w3.weight", f"{prefix}.w2.weight"
    prefix = f"model.layers.{layer}.mlp.experts.{expert}"
    return f"{prefix}.gate_proj.weight", f"{prefix}.up_proj.weight", f"{prefix}.down_proj.weight"


def router_tensor_name(config: MoEModelConfig, layer: int) -> str:
    """Checkpoint name of a layer's gate (router) weight."""
    if config.model_type == "gpt_oss":
        return f"model.layers.{layer}.mlp.router.weight"
    block = "block_sparse_moe" if config.model_type == "mixtral" else "mlp"
    return f"model.layers.{layer}.{block}.gate.weight"
