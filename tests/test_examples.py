"""The example configs a user copies must load."""

from __future__ import annotations

from pathlib import Path

import pytest

from elasticmoe.serve.server import load_serve_config

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


@pytest.mark.parametrize("path", sorted(EXAMPLES.glob("serve-*.yaml")), ids=lambda p: p.name)
def test_serve_examples_load(path, monkeypatch):
    monkeypatch.chdir(EXAMPLES.parent)  # policy paths are relative to the repo root
    cfg = load_serve_config(path, {})
    assert cfg.mode in ("local", "distributed")


def test_bad_serve_config_names_the_field(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: default\nnum_workers: 0\nportt: 1\n")
    with pytest.raises(ValueError, match="num_workers") as err:
        load_serve_config(bad, {})
    assert "portt" in str(err.value)


@pytest.mark.parametrize(
    "section, key, value, words",
    [
        ("engine", "max_num_seq", 4, "engine.max_num_seq: Extra inputs are not permitted"),
        ("engine", "block_size", 0, "engine.block_size: Input should be greater than or equal"),
        ("router", "rpc_timeout", 1, "router.rpc_timeout: Extra inputs are not permitted"),
        ("router", "slow_worker_factor", 0.5, "router.slow_worker_factor: Input should be greater"),
    ],
)
def test_engine_and_router_settings_are_typed_at_load(tmp_path, section, key, value, words):
    """A typo under engine.* or router.* fails when the config loads, naming the key."""
    bad = tmp_path / "bad.yaml"
    bad.write_text(f"model: default\n{section}:\n  {key}: {value}\n")
    with pytest.raises(ValueError, match=words):
        load_serve_config(bad, {})
