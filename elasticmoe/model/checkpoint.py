"""Read tensors from a Hugging Face checkpoint directory, one tensor at a time.

Expert workers load only the experts they host, so the reader never loads a
whole file: it maps tensor names to files (from ``model.safetensors.index.json``
or from each file's header) and opens tensors lazily. Every error names the
file and the tensor.
"""

from __future__ import annotations

import json
from pathlib import Path

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

    def get(
        self,
        name: str,
        shape: tuple[int, ...] | None = None,
        dtype: torch.dtype | None = None,
        device: torch.device | str = "cpu",
    ) -> torch.Tensor:
        """Load one tensor, checking its shape, and cast/move it as asked."""
        path = self.name_to_file.get(name)
        if path is None:
            raise CheckpointError(
                f"{self.model_dir}: tensor '{name}' is missing from the checkpoint"
            )
        try:
            tensor = self._open(path).get_tensor(name)  # type: ignore[attr-defined]
        except (SafetensorError, OSError, ValueError, RuntimeError) as e:
            raise CheckpointError(f"{path}: cannot read tensor '{name}' ({e})") from e
        if shape is not None and tuple(tensor.shape) != tuple(shape):
            raise CheckpointError(
                f"{path}: tensor '{name}' has shape {tuple(tensor.shape)}, expected {tuple(shape)}"
            )
        return tensor.to(device=device, dtype=dtype or tensor.dtype)


def expert_tensor_names(config: MoEModelConfig, layer: int, expert: int) -> tuple[str, str, str]:
    """Checkpoint names of one logical expert's (gate, up, down) projections."""
    if config.model_type == "mixtral":
        prefix = f"model.layers.{layer}.block_sparse_moe.experts.{expert}"
        return f"{prefix}.w1.weight", f"{prefix}.w3.weight", f"{prefix}.w2.weight"
    prefix = f"model.layers.{layer}.mlp.experts.{expert}"
    return f"{prefix}.gate_proj.weight", f"{prefix}.up_proj.weight", f"{prefix}.down_proj.weight"


def router_tensor_name(config: MoEModelConfig, layer: int) -> str:
    """Checkpoint name of a layer's gate (router) weight."""
    block = "block_sparse_moe" if config.model_type == "mixtral" else "mlp"
    return f"model.layers.{layer}.{block}.gate.weight"
