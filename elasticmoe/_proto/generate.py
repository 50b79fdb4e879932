"""Regenerate the Python gRPC code under ``elasticmoe/_proto`` from ``protos/``.

Run ``python -m elasticmoe._proto.generate`` after editing a ``.proto`` file and
commit the result; ``tests/test_protos.py`` fails when the committed code and a
fresh generation differ.

protoc names imports after the proto package (``from elasticmoe.v1 import
expert_pb2``), which would resolve to the top-level ``elasticmoe`` package and
fail; the import lines are rewritten to ``elasticmoe._proto.elasticmoe.v1``.
Generation is deterministic: the files are produced in sorted order into a
temporary directory by the protoc bundled with grpcio-tools, so the same
grpcio-tools version always writes the same bytes.
"""

from __future__ import annotations

import argparse
import re
import sys
import tempfile
from pathlib import Path

PROTO_ROOT = Path(__file__).resolve().parents[2] / "protos"
OUT_ROOT = Path(__file__).resolve().parent
# Python package that the proto package root maps to.
PACKAGE_PREFIX = "elasticmoe._proto"
GENERATED_SUFFIXES = ("_pb2.py", "_pb2.pyi", "_pb2_grpc.py")

# `from elasticmoe.v1 import x_pb2` / `import elasticmoe.v1.x_pb2` in protoc output.
_IMPORT_RE = re.compile(r"^(\s*)(from|import) (elasticmoe\.v\d+)(\b)", flags=re.MULTILINE)


def proto_files(proto_root: Path = PROTO_ROOT) -> list[Path]:
    """All ``.proto`` files under ``proto_root``, sorted, relative to it."""
    return sorted(p.relative_to(proto_root) for p in proto_root.rglob("*.proto"))


def _fix_imports(text: str) -> str:
    return _IMPORT_RE.sub(rf"\1\2 {PACKAGE_PREFIX}.\3\4", text)


def generate(out_root: Path, proto_root: Path = PROTO_ROOT) -> list[Path]:
    """Write the generated modules for every proto under ``out_root``.

    Returns the written paths relative to ``out_root``. Only the generated
    modules are written; the hand-written ``__init__.py`` files are left alone.
    """
    # Imported here so importing this module (e.g. for `proto_files`) does not
    # need grpcio-tools, which is a development dependency only.
    import grpc_tools
    from grpc_tools import protoc

    files = proto_files(proto_root)
    if not files:
        raise FileNotFoundError(f"{proto_root}: no .proto files")
    well_known = Path(grpc_tools.__file__).parent / "_proto"
    written: list[Path] = []
    with tempfile.TemporaryDirectory(prefix="elasticmoe-protoc-") as tmp:
        args = [
            "grpc_tools.protoc",
            f"-I{proto_root}",
            f"-I{well_known}",
            f"--python_out={tmp}",
            f"--pyi_out={tmp}",
            f"--grpc_python_out={tmp}",
            *(str(f) for f in files),
        ]
        code = protoc.main(args)
        if code != 0:
            raise RuntimeError(f"protoc failed with exit code {code}: {' '.join(args)}")
        for path in sorted(Path(tmp).rglob("*")):
            if not path.is_file() or not path.name.endswith(GENERATED_SUFFIXES):
                continue
            rel = path.relative_to(tmp)
            dest = out_root / rel
            dest.parent.mkdir(parents=True, exist_ok=True)
            dest.write_bytes(_fix_imports(path.read_bytes().decode()).encode())
            written.append(rel)
    return written


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point: regenerate into the package (or ``--out``)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--out", type=Path, default=OUT_ROOT, help="output root (default: the package)"
    )
    args = parser.parse_args(argv)
    if args.out == OUT_ROOT:
        # Drop stale modules of protos that were deleted or renamed.
        for old in OUT_ROOT.rglob("*"):
            if old.is_file() and old.name.endswith(GENERATED_SUFFIXES):
                old.unlink()
    written = generate(args.out)
    for rel in written:
        print(args.out / rel)
    return 0


if __name__ == "__main__":
    sys.exit(main())
