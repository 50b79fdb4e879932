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
