"""The committed gRPC code matches a fresh generation from ``protos/``."""

from __future__ import annotations

from pathlib import Path

import pytest

from elasticmoe._proto import generate

pytest.importorskip("grpc_tools")

REGENERATE = "run `python -m elasticmoe._proto.generate` and commit the result"


def test_generated_code_is_up_to_date(tmp_path: Path) -> None:
    written = generate.generate(tmp_path)
    assert written, "no code was generated"
    fresh = {p.relative_to(tmp_path) for p in tmp_path.rglob("*") if p.is_file()}
    committed = {
        p.relative_to(generate.OUT_ROOT)
        for p in generate.OUT_ROOT.rglob("*")
        if p.is_file() and p.name.endswith(generate.GENERATED_SUFFIXES)
    }
    assert committed == fresh, f"generated files differ from the committed ones; {REGENERATE}"
    for rel in sorted(fresh):
        assert (generate.OUT_ROOT / rel).read_bytes() == (tmp_path / rel).read_bytes(), (
            f"elasticmoe/_proto/{rel} is stale; {REGENERATE}"
        )


def test_generation_is_deterministic(tmp_path: Path) -> None:
    first, second = tmp_path / "a", tmp_path / "b"
    generate.generate(first)
    generate.generate(second)
    files = sorted(p.relative_to(first) for p in first.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(second) for p in second.rglob("*") if p.is_file())
    for rel in files:
        assert (first / rel).read_bytes() == (second / rel).read_bytes(), rel


def test_generated_modules_import_from_the_package() -> None:
    from elasticmoe._proto.elasticmoe.v1 import expert_pb2, expert_pb2_grpc

    assert expert_pb2.DESCRIPTOR.package == "elasticmoe.v1"
    assert expert_pb2.DESCRIPTOR.name == "elasticmoe/v1/expert.proto"
    service = expert_pb2.DESCRIPTOR.services_by_name["ExpertService"]
    assert sorted(service.methods_by_name) == [
        "FetchExpert",
        "Forward",
        "ForwardStream",
        "ForwardTokens",
        "Health",
        "LoadExperts",
        "Stats",
        "UnloadExperts",
    ]
    assert hasattr(expert_pb2_grpc, "ExpertServiceStub")
    text = (generate.OUT_ROOT / "elasticmoe/v1/expert_pb2_grpc.py").read_text()
    assert "from elasticmoe.v1 import" not in text


def test_wire_contract_field_numbers() -> None:
    """The router is written against these numbers; changing one breaks it silently."""
    from elasticmoe._proto.elasticmoe.v1 import expert_pb2

    def fields(message: type) -> dict[str, int]:
        return {f.name: f.number for f in message.DESCRIPTOR.fields}

    assert fields(expert_pb2.Tensor) == {"dtype": 1, "shape": 2, "data": 3}
    assert fields(expert_pb2.ExpertRows) == {"expert": 1, "num_rows": 2}
    assert fields(expert_pb2.ForwardRequest) == {"layer": 1, "experts": 2, "hidden": 3, "epoch": 4}
    assert fields(expert_pb2.ForwardResponse) == {"output": 1}
    assert fields(expert_pb2.ExpertRef) == {"layer": 1, "expert": 2}
    assert fields(expert_pb2.ExpertInfo) == {"layer": 1, "expert": 2, "checksum": 3, "nbytes": 4}
    assert fields(expert_pb2.LoadExpertsRequest) == {"experts": 1, "source": 2, "checksums": 3}
    assert fields(expert_pb2.ExpertChunk) == {
        "name": 1,
        "dtype": 2,
        "shape": 3,
        "offset": 4,
        "data": 5,
        "checksum": 6,
    }
    assert fields(expert_pb2.StatsResponse) == {
        "worker_id": 1,
        "experts": 2,
        "num_slots": 3,
        "forward_calls": 4,
        "rows_served": 5,
        "compute_seconds": 6,
        "rows_per_expert": 7,
    }
