"""elasticmoe: serve Mixture-of-Experts LLMs with expert-level elasticity.

The public names load on first use, so ``import elasticmoe`` (and the
torch- and Ray-free :mod:`elasticmoe.core` below it) loads neither torch nor
Ray; ``from elasticmoe import LLM`` does.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from elasticmoe.engine.request import CompletionOutput, RequestOutput, SamplingParams
    from elasticmoe.llm import LLM

__all__ = ["LLM", "CompletionOutput", "RequestOutput", "SamplingParams"]
__version__ = "0.1.0"

_PUBLIC = {
    "LLM": "elasticmoe.llm",
    "CompletionOutput": "elasticmoe.engine.request",
    "RequestOutput": "elasticmoe.engine.request",
    "SamplingParams": "elasticmoe.engine.request",
}


def __getattr__(name: str) -> Any:
    module = _PUBLIC.get(name)
    if module is None:
        raise AttributeError(f"module 'elasticmoe' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later look-ups skip this function
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_PUBLIC])
