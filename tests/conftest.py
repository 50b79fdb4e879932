"""Shared fixtures: tiny Hugging Face reference models built by transformers."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import ray

sys.path.insert(0, str(Path(__file__).parent))

from elasticmoe.control.cluster import start_local_ray

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

    A new instance, never another session's cluster (e.g. the chaos drill's); its start is
    retried, since on a loaded 2-core machine it can time out (seen in full runs).
    """
    start_local_ray(
        num_cpus=12, include_dashboard=False, namespace="elasticmoe", log_to_driver=False
    )
    yield
    ray.shutdown()
