"""elasticmoe vs vLLM's CPU build on the same checkpoint, prompts and sampling settings.

Two parts, each reported as ratios to vLLM measured in the same run:

* **offline**: ``LLM.generate`` over ``--num-prompts`` random prompts of ``--input-len``
  tokens, ``--output-len`` greedy tokens each with ``ignore_eos`` (every request yields exactly
  that many), on the issue-13 Mixtral (random weights, hidden 256, intermediate 512, 4 layers,
  8 heads / 4 kv heads, 16 experts top-2, vocab 4096) unless ``--offline-model`` is given.
  elasticmoe runs ``mode="local"`` and ``mode="distributed"``; each engine runs in a fresh
  process, warms up, then times ``--repeats`` rounds (best and all reported).
* **served**: the OpenAI servers (``elasticmoe serve`` local and distributed, and
  ``python -m vllm.entrypoints.openai.api_server``) on ``--served-model`` (``default``), driven
  by AIPerf with identical flags (chat, streaming, synthetic prompts, ``ignore_eos``).

vLLM and AIPerf are installed on first use into ``.vllm-venv/`` and ``.aiperf-venv/``
(``bench/vllm_setup.py``); never part of ``make test``. Prints one JSON document on stdout::

    python bench/vs_vllm.py > vs_vllm.json                 # everything
    python bench/vs_vllm.py --setup-only                   # just install vLLM and AIPerf
    python bench/vs_vllm.py --parts offline --modes local  # a quick look
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as `python bench/vs_vllm.py`
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import REPO_ROOT, console, emit_json
from bench.vllm_setup import ensure_aiperf, ensure_tcmalloc, vllm_env

# The checkpoint of issue 13's offline table.
ISSUE_MIXTRAL = {
    "hidden_size": 256,
    "intermediate_size": 512,
    "num_hidden_layers": 4,
    "num_attention_heads": 8,
    "num_key_value_heads": 4,
    "head_dim": 32,
    "num_experts": 16,
    "num_experts_per_tok": 2,
    "vocab_size": 4096,
}

# Run in a fresh process by either engine's python: both expose a vLLM-shaped `LLM`.
# A main guard, because vLLM may spawn processes that re-import the script.
_OFFLINE_WORKER = r"""
import json, sys, time

def main():
    spec = json.loads(sys.argv[1])
    if spec["engine"] == "vllm":
        from vllm import LLM, SamplingParams
        llm = LLM(model=spec["model"], dtype=spec["dtype"], seed=0,
                  max_num_seqs=spec["max_num_seqs"],
                  max_num_batched_tokens=spec["max_num_batched_tokens"])
        sp = SamplingParams(max_tokens=spec["output_len"], temperature=0, ignore_eos=True)
        gen = lambda ps: llm.generate(ps, sp, use_tqdm=False)
    else:
        from elasticmoe import LLM, SamplingParams
        kw = dict(mode=spec["mode"], dtype=spec["dtype"], max_num_seqs=spec["max_num_seqs"],
                  max_num_batched_tokens=spec["max_num_batched_tokens"])
        if spec["mode"] == "distributed":
            kw.update(num_workers=spec["workers"], progress=False)
        kw.update(spec.get("extra", {}))
        llm = LLM(model=spec["model"], **kw)
        sp = SamplingParams(max_tokens=spec["output_len"], temperature=0, ignore_eos=True)
        gen = lambda ps: llm.generate(ps, sp)
    prompts = [{"prompt_token_ids": p} for p in spec["prompts"]]
    t = time.perf_counter()
    gen(prompts[: spec["warmup"]])
    warm = time.perf_counter() - t
    walls, outs = [], None
    for _ in range(spec["repeats"]):
        t = time.perf_counter()
        outs = gen(prompts)
        walls.append(time.perf_counter() - t)
    ids = [list(o.outputs[0].token_ids) for o in outs]
    print("RESULT " + json.dumps({"walls": walls, "warmup_s": warm, "token_ids": ids}), flush=True)
    if hasattr(llm, "shutdown"):
        llm.shutdown()

if __name__ == "__main__":
    main()
"""


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--setup-only", action="store_true", help="install vLLM and AIPerf, then stop")
    p.add_argument("--parts", default="offline,served", help="comma list of offline, served")
    p.add_argument("--modes", default="local,distributed", help="elasticmoe modes to run")
    p.add_argument("--workers", type=int, default=2, help="expert workers in distributed mode")
    p.add_argument(
        "--offline-model",
        type=Path,
        default=None,
        help="checkpoint (default: build issue 13's Mixtral under .models/)",
    )
    p.add_argument("--served-model", default="default", help="checkpoint dir or built-in name")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--num-prompts", type=int, default=64)
    p.add_argument("--input-len", type=int, default=64)
    p.add_argument("--output-len", type=int, default=64)
    p.add_argument("--repeats", type=int, default=3, help="timed offline rounds per engine")
    p.add_argument("--max-num-seqs", type=int, default=256)
    p.add_argument("--max-num-batched-tokens", type=int, default=4096)
    p.add_argument("--requests", type=int, default=128, help="served: requests per run")
    p.add_argument("--concurrency", type=int, default=32, help="served: AIPerf concurrency")
    p.add_argument("--warmup-requests", type=int, default=8, help="served: AIPerf warm-up")
    p.add_argument(
        "--stream-interval",
        type=int,
        default=1,
        help="served: both servers' --stream-interval (tokens per streamed chunk after the first)",
    )
    p.add_argument("--vllm-threads", default="0-1", help="VLLM_CPU_OMP_THREADS_BIND")
    p.add_argument(
        "--vllm-build", choices=("cpu", "cuda"), default="cpu", help="cuda: see bench/gpu.sh"
    )
    p.add_argument(
        "--engine-args",
        type=json.loads,
        default={},
        help="extra elasticmoe engine settings as JSON, e.g. '{\"decode_buckets\": [8, 16]}'",
    )
    p.add_argument(
        "--elasticmoe-env",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="environment for elasticmoe's processes (repeatable), e.g. OMP_WAIT_POLICY=PASSIVE",
    )
    p.add_argument(
        "--elasticmoe-malloc",
        choices=("tcmalloc", "system"),
        default="tcmalloc",
        help="the allocator elasticmoe's processes run with: tcmalloc (the library vLLM is "
        "given, preloaded the same way) or glibc's malloc",
    )
    p.add_argument(
        "--elasticmoe-ingress",
        choices=("auto", "direct", "proxy"),
        default="auto",
        help="served: elasticmoe serve's --ingress (auto: the front listens itself, as "
        "vLLM's API server does; proxy: through Ray Serve's HTTP proxy)",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--server-timeout", type=float, default=600.0)
    p.add_argument(
        "--keep-artifacts", type=Path, default=None, help="copy AIPerf's artifact folders here"
    )
    return p.parse_args(argv)


# ------------------------------------------------------------------ helpers
def _issue_model(dtype: str) -> Path:
    from elasticmoe.model.init_model import init_model

    out = REPO_ROOT / ".models" / f"vs_vllm_mixtral_{dtype}"
    if not (out / "config.json").exists():
        init_model("mixtral", "small", out, dtype=dtype, overwrite=True, **ISSUE_MIXTRAL)
    return out


def _resolve_model(name: str) -> Path:
    path = Path(name)
    if path.is_dir():
        return path.resolve()
    builtin = REPO_ROOT / "elasticmoe" / "models" / name
    if builtin.is_dir():
        return builtin
    raise SystemExit(f"--served-model {name!r}: neither a directory nor a built-in model")


def _prompts(n: int, length: int, vocab: int, seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    # ids 10.. keep clear of the special tokens at the bottom of our vocabularies
    return [[rng.randrange(10, vocab) for _ in range(length)] for _ in range(n)]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run_offline(python: Path, env: dict[str, str], spec: dict[str, Any]) -> dict[str, Any]:
    with tempfile.NamedTemporaryFile("w", suffix="_offline_worker.py", delete=False) as f:
        f.write(_OFFLINE_WORKER)
        script = f.name
    label = spec["engine"] + ("" if spec["engine"] == "vllm" else f" {spec['mode']}")
    console.print(f"offline: {label} ...")
    proc = subprocess.run(
        [str(python), script, json.dumps(spec)],
        env=env,
        capture_output=True,
        text=True,
        cwd=tempfile.gettempdir(),
        check=False,
    )
    line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")), None)
    if proc.returncode != 0 or line is None:
        tail = (proc.stderr or proc.stdout)[-3000:]
        raise RuntimeError(f"offline {label} failed (rc={proc.returncode}):\n{tail}")
    res = json.loads(line[len("RESULT ") :])
    tokens = spec["num_prompts"] * spec["output_len"]
    walls = res["walls"]
    out = {
        "output_tokens": tokens,
        "output_tokens_per_s_best": round(tokens / min(walls), 1),
        "output_tokens_per_s_all": [round(tokens / w, 1) for w in walls],
        "wall_s_best": round(min(walls), 3),
        "warmup_s": round(res["warmup_s"], 2),
        "requests_with_wrong_length": sum(len(t) != spec["output_len"] for t in res["token_ids"]),
    }
    console.print(f"offline: {label}: {out['output_tokens_per_s_best']} tok/s (best)")
    return {**out, "_token_ids": res["token_ids"]}


def _wait_ready(url: str, proc: subprocess.Popen, timeout: float) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with rc={proc.returncode} before it was ready")
        try:
            with urllib.request.urlopen(url + "/v1/models", timeout=5) as r:
                data = json.loads(r.read())
                return data["data"][0]["id"]
        except (OSError, ValueError, KeyError, IndexError):
            time.sleep(2)
    raise RuntimeError(f"server at {url} not ready after {timeout:.0f}s")


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is not None:
        return
    try:
        os.killpg(proc.pid, signal.SIGINT)
        proc.wait(timeout=60)
    except (subprocess.TimeoutExpired, ProcessLookupError):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)


def _aiperf_metrics(artifact_dir: Path) -> dict[str, Any]:
    found = sorted(artifact_dir.rglob("profile_export_aiperf.json"))
    if not found:
        raise RuntimeError(f"AIPerf wrote no profile_export_aiperf.json under {artifact_dir}")
    data = json.loads(found[0].read_text())
    metrics = data.get("records", data)

    def pick(name: str, stat: str) -> float | None:
        m = metrics.get(name)
        if isinstance(m, dict):
            v = m.get(stat)
            return None if v is None else round(float(v), 3)
        return None

    return {
        "output_tokens_per_s": pick("output_token_throughput", "avg"),
        "requests_per_s": pick("request_throughput", "avg"),
        "itl_ms_p50": pick("inter_token_latency", "p50"),
        "itl_ms_avg": pick("inter_token_latency", "avg"),
        "itl_ms_p99": pick("inter_token_latency", "p99"),
        "ttft_ms_p50": pick("time_to_first_token", "p50"),
        "request_latency_ms_p50": pick("request_latency", "p50"),
        "output_len_avg": pick("output_sequence_length", "avg"),
        "request_count": pick("request_count", "avg"),
        "error_request_count": pick("error_request_count", "avg") or 0,
    }


def _aiperf_flags(args: argparse.Namespace, model_name: str, tokenizer: Path) -> list[str]:
    return [
        "profile",
        "--model", model_name,
        "--tokenizer", str(tokenizer),
        "--endpoint-type", "chat",
        "--streaming",
        "--synthetic-input-tokens-mean", str(args.input_len),
        "--synthetic-input-tokens-stddev", "0",
        "--output-tokens-mean", str(args.output_len),
        "--output-tokens-stddev", "0",
        "--extra-inputs", "ignore_eos:true",
        "--concurrency", str(args.concurrency),
        "--request-count", str(args.requests),
        "--warmup-request-count", str(args.warmup_requests),
        "--random-seed", str(args.seed),
        "--ui-type", "none",
    ]  # fmt: skip


def _run_served(
    label: str,
    server_cmd: list[str],
    env: dict[str, str],
    port: int,
    args: argparse.Namespace,
    tokenizer: Path,
) -> dict[str, Any]:
    aiperf = ensure_aiperf()
    url = f"http://127.0.0.1:{port}"
    log = tempfile.NamedTemporaryFile(  # noqa: SIM115 (closed in the finally below)
        "w+", suffix=f"_{label.replace(' ', '_')}.log", delete=False
    )
    console.print(f"served: starting {label} ({' '.join(server_cmd[:4])} ...)")
    proc = subprocess.Popen(
        server_cmd,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
        cwd=tempfile.gettempdir(),
    )
    try:
        t0 = time.monotonic()
        model_name = _wait_ready(url, proc, args.server_timeout)
        ready_s = time.monotonic() - t0
        artifacts = Path(tempfile.mkdtemp(prefix=f"aiperf_{label.replace(' ', '_')}_"))
        cmd = [
            str(aiperf),
            *_aiperf_flags(args, model_name, tokenizer),
            "--url",
            url,
            "--artifact-dir",
            str(artifacts),
        ]
        console.print(
            f"served: {label}: AIPerf ({args.requests} requests, concurrency {args.concurrency})"
        )
        run = subprocess.run(
            cmd, capture_output=True, text=True, check=False, cwd=tempfile.gettempdir()
        )
        if run.returncode != 0:
            raise RuntimeError(
                f"aiperf failed for {label} (rc={run.returncode}):\n"
                f"{(run.stderr or run.stdout)[-3000:]}"
            )
        metrics = _aiperf_metrics(artifacts)
        if args.keep_artifacts:
            dest = args.keep_artifacts / label.replace(" ", "_")
            shutil.rmtree(dest, ignore_errors=True)
            shutil.copytree(artifacts, dest)
        shutil.rmtree(artifacts, ignore_errors=True)
        console.print(
            f"served: {label}: {metrics['output_tokens_per_s']} tok/s, "
            f"ITL p50 {metrics['itl_ms_p50']} ms"
        )
        return {"server_ready_s": round(ready_s, 1), **metrics}
    except Exception:
        log.seek(0)
        console.print(f"[red]{label} server log tail:\n{log.read()[-3000:]}", markup=False)
        raise
    finally:
        _stop(proc)
        log.close()


def _elasticmoe_env(args: argparse.Namespace) -> dict[str, str]:
    env = dict(os.environ)
    if args.elasticmoe_malloc == "tcmalloc":
        # the same allocator as vLLM's processes (bench/vllm_setup.py): a fair pair, and what
        # README recommends for CPU serving
        tc = ensure_tcmalloc()
        if tc is not None:
            env["LD_PRELOAD"] = ":".join([str(tc), env.get("LD_PRELOAD", "")]).rstrip(":")
    for item in args.elasticmoe_env:
        key, sep, value = item.partition("=")
        if not sep:
            raise SystemExit(f"--elasticmoe-env {item!r}: use KEY=VALUE")
        env[key] = value
    return env


def _ratio(a: float | None, b: float | None) -> float | None:
    return None if not a or not b else round(a / b, 3)


# -------------------------------------------------------------------- parts
def offline_part(args: argparse.Namespace, modes: list[str]) -> dict[str, Any]:
    model = args.offline_model.resolve() if args.offline_model else _issue_model(args.dtype)
    vocab = json.loads((model / "config.json").read_text())["vocab_size"]
    prompts = _prompts(args.num_prompts, args.input_len, vocab, args.seed)
    spec = {
        "model": str(model), "dtype": args.dtype, "prompts": prompts,
        "num_prompts": args.num_prompts, "output_len": args.output_len,
        "repeats": args.repeats, "warmup": min(8, args.num_prompts),
        "max_num_seqs": args.max_num_seqs, "max_num_batched_tokens": args.max_num_batched_tokens,
        "workers": args.workers, "extra": args.engine_args,
    }  # fmt: skip
    venv = vllm_env(args.vllm_threads, build=args.vllm_build)
    result: dict[str, Any] = {
        "model": str(model),
        "model_overrides": ISSUE_MIXTRAL if args.offline_model is None else None,
    }
    result["vllm"] = _run_offline(venv.python, venv.env, {**spec, "engine": "vllm"})
    ours_env = _elasticmoe_env(args)
    for mode in modes:
        r = _run_offline(
            Path(sys.executable), ours_env, {**spec, "engine": "elasticmoe", "mode": mode}
        )
        r["ratio_vs_vllm"] = _ratio(
            r["output_tokens_per_s_best"], result["vllm"]["output_tokens_per_s_best"]
        )
        # informational: bf16 kernels differ, so greedy paths of random weights can diverge
        r["greedy_tokens_equal_vllm"] = sum(
            a == b for a, b in zip(r["_token_ids"], result["vllm"]["_token_ids"], strict=True)
        )
        result[f"elasticmoe_{mode}"] = r
    _distributed_vs_local(result, "output_tokens_per_s_best", None)
    for v in result.values():
        if isinstance(v, dict):
            v.pop("_token_ids", None)
    return result


def served_part(args: argparse.Namespace, modes: list[str]) -> dict[str, Any]:
    model = _resolve_model(args.served_model)
    venv = vllm_env(args.vllm_threads, build=args.vllm_build)
    result: dict[str, Any] = {
        "model": args.served_model,
        "aiperf_flags": _aiperf_flags(args, "<served name>", model),
        "elasticmoe_ingress": args.elasticmoe_ingress,
    }
    port = _free_port()
    vllm_cmd = [
        str(venv.python), "-m", "vllm.entrypoints.openai.api_server",
        "--model", str(model), "--served-model-name", model.name,
        "--host", "127.0.0.1", "--port", str(port), "--dtype", args.dtype,
        "--max-num-seqs", str(args.max_num_seqs), "--seed", str(args.seed),
        "--stream-interval", str(args.stream_interval),
    ]  # fmt: skip
    result["vllm"] = _run_served("vllm", vllm_cmd, venv.env, port, args, model)
    elasticmoe = Path(sys.executable).parent / "elasticmoe"
    for mode in modes:
        port = _free_port()
        cmd = [
            str(elasticmoe),
            "serve",
            "--model",
            args.served_model,
            "--mode",
            mode,
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--stream-interval",
            str(args.stream_interval),
            "--ingress",
            args.elasticmoe_ingress,
        ]
        if mode == "distributed":
            cmd += ["--workers", str(args.workers)]
        r = _run_served(f"elasticmoe {mode}", cmd, _elasticmoe_env(args), port, args, model)
        r["ratio_output_tokens_per_s_vs_vllm"] = _ratio(
            r["output_tokens_per_s"], result["vllm"]["output_tokens_per_s"]
        )
        r["ratio_itl_p50_vs_vllm"] = _ratio(r["itl_ms_p50"], result["vllm"]["itl_ms_p50"])
        result[f"elasticmoe_{mode}"] = r
    _distributed_vs_local(result, "output_tokens_per_s", "itl_ms_p50")
    return result


def _distributed_vs_local(result: dict[str, Any], throughput: str, latency: str | None) -> None:
    """Issue 14's figures: the distributed mode against the local one of the same run."""
    local, dist = result.get("elasticmoe_local"), result.get("elasticmoe_distributed")
    if local is None or dist is None:
        return
    dist[f"ratio_{throughput}_vs_local"] = _ratio(dist[throughput], local[throughput])
    if latency is not None:
        dist[f"ratio_{latency}_vs_local"] = _ratio(dist[latency], local[latency])


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = _parse_args(argv)
    if args.setup_only:
        ensure_aiperf()
        env = vllm_env(args.vllm_threads, build=args.vllm_build)
        emit_json(
            {
                "vllm_python": str(env.python),
                "vllm_version": env.version,
                "ld_preload": env.env.get("LD_PRELOAD"),
            }
        )
        return {}
    parts = [p.strip() for p in args.parts.split(",") if p.strip()]
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    bad = set(parts) - {"offline", "served"} or set(modes) - {"local", "distributed"}
    if bad:
        raise SystemExit(f"unknown --parts/--modes value(s): {sorted(bad)}")
    env = vllm_env(args.vllm_threads, build=args.vllm_build)
    result: dict[str, Any] = {
        "benchmark": "vs_vllm",
        "vllm_version": env.version,
        "machine": {
            "cpus": os.cpu_count(),
            "platform": platform.platform(),
            "loadavg_at_start": os.getloadavg(),
        },
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "ld_preload": {
            "vllm": env.env.get("LD_PRELOAD"),
            "elasticmoe": _elasticmoe_env(args).get("LD_PRELOAD"),
        },
    }
    if "offline" in parts:
        result["offline"] = offline_part(args, modes)
    if "served" in parts:
        result["served"] = served_part(args, modes)
    result["machine"]["loadavg_at_end"] = os.getloadavg()
    emit_json(result)
    return result


if __name__ == "__main__":
    main()
