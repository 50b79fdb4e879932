"""Built-in model names and where their checkpoints live.

Nothing is downloaded. ``default`` is the trained checkpoint shipped inside the package
(``elasticmoe/models/default``, made by ``elasticmoe train --config
examples/train/default.yaml``); the other built-in names are random-weight checkpoints
written by :func:`elasticmoe.model.init_model.init_model` on first use.
"""

from __future__ import annotations

import os
from pathlib import Path

from elasticmoe.model.init_model import ARCHS, PRESETS, init_model

DEFAULT_MODEL = "default"
# The trained default model, shipped as package data.
SHIPPED_MODELS: dict[str, Path] = {
    DEFAULT_MODEL: Path(__file__).resolve().parent.parent / "models" / "default",
}
# name -> (arch, preset): random weights, written on first use
RANDOM_MODELS: dict[str, tuple[str, str]] = {
    f"{arch}-{preset}": (arch, preset) for arch in ARCHS for preset in PRESETS
}
BUILTIN_MODELS: tuple[str, ...] = (*SHIPPED_MODELS, *RANDOM_MODELS)


def home() -> Path:
    """Where elasticmoe keeps built-in checkpoints (``$ELASTICMOE_HOME``)."""
    return Path(os.environ.get("ELASTICMOE_HOME", Path.home() / ".cache" / "elasticmoe"))


def resolve_model(model: str | os.PathLike) -> Path:
    """A checkpoint directory for a path or a built-in name (random ones created on first use)."""
    path = Path(model)
    if path.is_dir():
        return path
    name = str(model)
    if name in SHIPPED_MODELS:
        shipped = SHIPPED_MODELS[name]
        if not (shipped / "config.json").is_file():
            raise FileNotFoundError(
                f"built-in model {name!r} is missing from {shipped}; rebuild it with "
                "`make default-model` (elasticmoe train --config examples/train/default.yaml)"
            )
        return shipped
    if name in RANDOM_MODELS:
        target = home() / "models" / name
        if not (target / "config.json").is_file():
            arch, preset = RANDOM_MODELS[name]
            init_model(arch, preset, target, overwrite=True)
        return target
    raise FileNotFoundError(
        f"model {name!r} is neither a checkpoint directory nor a built-in model "
        f"({', '.join(sorted(BUILTIN_MODELS))})"
    )
