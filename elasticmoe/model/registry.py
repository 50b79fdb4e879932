"""Built-in model names and where their checkpoints live.

Nothing is downloaded: a built-in name is a random-weight checkpoint written
by :func:`elasticmoe.model.init_model.init_model` on first use.
"""

from __future__ import annotations

import os
from pathlib import Path

from elasticmoe.model.init_model import ARCHS, PRESETS, init_model

DEFAULT_MODEL = "default"
# name -> (arch, preset)
BUILTIN_MODELS: dict[str, tuple[str, str]] = {
    DEFAULT_MODEL: ("mixtral", "small"),
    **{f"{arch}-{preset}": (arch, preset) for arch in ARCHS for preset in PRESETS},
}


def home() -> Path:
    """Where elasticmoe keeps built-in checkpoints (``$ELASTICMOE_HOME``)."""
    return Path(os.environ.get("ELASTICMOE_HOME", Path.home() / ".cache" / "elasticmoe"))


def resolve_model(model: str | os.PathLike) -> Path:
    """A checkpoint directory for a path or a built-in name (created on first use)."""
    path = Path(model)
    if path.is_dir():
        return path
    name = str(model)
    if name in BUILTIN_MODELS:
        target = home() / "models" / name
        if not (target / "config.json").is_file():
            arch, preset = BUILTIN_MODELS[name]
            init_model(arch, preset, target, overwrite=True)
        return target
    raise FileNotFoundError(
        f"model {name!r} is neither a checkpoint directory nor a built-in model "
        f"({', '.join(sorted(BUILTIN_MODELS))})"
    )
