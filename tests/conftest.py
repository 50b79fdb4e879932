"""Shared fixtures: tiny Hugging Face reference models built by transformers."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import ray

sys.path.insert(0, str(Path(__file__).parent))

from hf_models import FAMILIES, make_hf_model


@pytest.fixture(scope="session")
def hf_family_models(tmp_path_factory) -> dict:
    """family -> (checkpoint dir, transformers model), built once per session."""
    out = {}
    for family in FAMILIES:
        path = tmp_path_factory.mktemp(family)
        out[family] = (path, make_hf_model(family, path))
    return out


@pytest.fixture(autouse=True)
def _elasticmoe_home(tmp_path_factory, monkeypatch):
    """Keep built-in checkpoints out of the user's home."""
    monkeypatch.setenv("ELASTICMOE_HOME", str(tmp_path_factory.getbasetemp() / "elasticmoe-home"))


@pytest.fixture(scope="module")
def ray_instance():
    """One local Ray instance per test module that asks for it (stopped at module end).

    Starting Ray's GCS can time out on a loaded 2-core machine (seen once in a full run);
    a second attempt after a clean shutdown succeeds.
    """
    for attempt in range(3):
        try:
            ray.init(
                address="local",  # never another session's cluster (e.g. the chaos drill's)
                num_cpus=12,
                include_dashboard=False,
                namespace="elasticmoe",
                log_to_driver=False,
            )
            break
        except RuntimeError:
            ray.shutdown()
            if attempt == 2:
                raise
    yield
    ray.shutdown()
