"""Decode step time: experts on remote workers (node streams or gRPC) vs in-process, same engine.

Both runs use the same LLMEngine code in this process; only the expert
backend differs (ExpertRouter to `--num-workers` ExpertWorker actors vs
LocalExperts). For each batch size B, B requests are prefilled, then `--steps`
decode steps (B tokens each) are timed. Reported per batch size: mean step
time of both, the ratio distributed/local, the time inside the expert backend
per step, the workers' compute time, and the dispatch overhead per MoE layer.

The distributed engine runs each batch size once per ``--micro-batches`` value on the same
workers (1: one batch per step; 2: two micro-batches in ping-pong, while one's rows are at
the workers the engine computes the other's attention), so both are measured in the same
run against the same local baseline. A step splits only with at least
``--micro-batch-min-seqs`` sequences per micro-batch (EngineConfig's default unless given).

Honest accounting: the workers of a layer run in parallel, so the compute on
the critical path is that of the SLOWEST worker of each layer call (the router
records it from each frame's reported compute time); dispatch overhead =
(router time - critical-path compute) per layer call. Code without those
figures (before issue 14) falls back to the workers' summed compute / workers.
`--cluster` runs the workers on a local 3-node ``ray.cluster_utils.Cluster``.
``--dtype bfloat16`` runs engine and workers in bf16, where the CPU expert kernel
(``elasticmoe.model.kernels``) computes the experts on both sides; medians are reported
beside the means, which one stalled step can move. The distributed engine runs
``--distributed-engine-threads`` torch threads (1, as a deployment's engine actor gets
from Ray), the local engine torch's default (all cores). ``--rounds N`` runs the two N times,
alternating, and reports each figure's median over the rounds (with the range of each p50
ratio): on a shared machine one run of each can land in a fast and a slow minute.

Prints JSON on stdout; progress on stderr.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import ray
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import console, emit_json

from elasticmoe.control.cluster import start_local_ray
from elasticmoe.core.expert_map import ExpertMap
from elasticmoe.core.experts import LogicalExpert
from elasticmoe.core.placement import initial_placement
from elasticmoe.engine.config import EngineConfig
from elasticmoe.engine.engine import LLMEngine
from elasticmoe.engine.request import SamplingParams
from elasticmoe.experts.local import LocalExperts
from elasticmoe.experts.worker import start_worker
from elasticmoe.model.config import load_config
from elasticmoe.model.init_model import init_model
from elasticmoe.router.router import ExpertRouter, RouterConfig


class TimedBackend:
    """Wraps an expert backend and accumulates the time spent in it (and counts the layer
    calls: forward or submit)."""

    def __init__(self, inner) -> None:
        self.inner = inner
        self.seconds = 0.0
        self.calls = 0

    def forward(self, layer, hidden, gate):
        self.calls += 1
        start = time.perf_counter()
        out = self.inner.forward(layer, hidden, gate)
        self.seconds += time.perf_counter() - start
        return out

    def __getattr__(self, name):
        # the asynchronous form only where the inner backend has it (the runner splits
        # steps into micro-batches only for a backend with ``submit``)
        if name in ("submit", "wait"):
            inner = getattr(self.inner, name)

            def timed(*args):
                self.calls += name == "submit"
                start = time.perf_counter()
                out = inner(*args)
                self.seconds += time.perf_counter() - start
                return out

            return timed
        raise AttributeError(name)

    @property
    def lost_rows(self):
        return getattr(self.inner, "lost_rows", ())

    def begin_step(self) -> None:
        self.inner.begin_step()

    def end_step(self) -> None:
        self.inner.end_step()


def measure(engine: LLMEngine, batch: int, steps: int, prompt_len: int) -> dict[str, float]:
    """Prefill `batch` requests, then time `steps` pure decode steps."""
    backend: TimedBackend = engine.model.experts  # type: ignore[assignment]
    params = SamplingParams(max_tokens=steps + 4, temperature=0, ignore_eos=True)
    ids = [
        engine.add_request(
            {"prompt_token_ids": [(7 * i + j) % 400 + 5 for j in range(prompt_len)]}, params
        )
        for i in range(batch)
    ]
    # run until every request is decoding (one token per step)
    while (
        any(len(r.output_token_ids) == 0 for r in engine.scheduler.running)
        or engine.scheduler.waiting
    ):
        engine.step()
    times = []
    backend.seconds = 0.0
    backend.calls = 0
    for _ in range(steps):
        start = time.perf_counter()
        engine.step()
        times.append(time.perf_counter() - start)
    expert_s = backend.seconds / steps
    num_moe_layers = len(engine.model_config.moe_layers)
    for request_id in ids:
        engine.abort_request(request_id)
        engine.forget_request(request_id)
    return {
        "step_ms": 1e3 * statistics.mean(times),
        "p50_step_ms": 1e3 * statistics.median(times),
        "expert_backend_ms": 1e3 * expert_s,
        # expert backend calls per MoE layer and step: 2 when the steps ran in ping-pong
        "calls_per_layer_step": backend.calls / (steps * num_moe_layers),
    }


def router_compute(router) -> tuple[float, float] | None:
    """(critical-path compute, all workers' compute) so far, if the router records them."""
    stats = router.stats
    if not hasattr(stats, "critical_compute_seconds"):
        return None
    return stats.critical_compute_seconds, stats.worker_compute_seconds


def worker_compute_seconds(handles) -> float:
    return sum(ray.get(h.info.remote())["compute_seconds"] for h in handles)


def run_mode(args: argparse.Namespace) -> dict:
    """Time one mode (local or distributed) in this process; returns per-batch figures."""
    model_dir = Path(args.model_dir)
    mc = load_config(model_dir)
    cfg = EngineConfig(
        model=str(model_dir),
        dtype=args.dtype,
        num_kv_blocks=4096,
        max_num_seqs=256,
        max_num_batched_tokens=4096,
        **(
            {"micro_batch_min_seqs": args.micro_batch_min_seqs} if args.micro_batch_min_seqs else {}
        ),
    )
    batches = [int(b) for b in args.batch_sizes.split(",")]
    out: dict = {
        "torch_threads": torch.get_num_threads(),
        "micro_batch_min_seqs": cfg.micro_batch_min_seqs,
        "results": {},
    }
    if args.run == "local":
        engine = LLMEngine(
            cfg,
            expert_backend=lambda r, m, d, dev: TimedBackend(
                LocalExperts.from_checkpoint(r, m.config, d, dev)
            ),
        )
        for batch in batches:
            measure(engine, batch, 3, args.prompt_len)  # warm-up
            out["results"][batch] = measure(engine, batch, args.steps, args.prompt_len)
        return out
    experts = [LogicalExpert(layer, e) for layer in mc.moe_layers for e in range(mc.num_experts)]
    cluster = None
    # the workers run at the priority a deployment gives them (Ray's default is nice 15,
    # under which this process's engine would take the cores from them)
    nice0 = {"worker_niceness": 0}
    if args.cluster:
        from ray.cluster_utils import Cluster

        # 3 nodes on this machine; the workers spread over them (one CPU each)
        per_node = -(-(args.num_workers + 1) // 3)
        head = {"num_cpus": per_node, "_system_config": nice0}
        cluster = Cluster(initialize_head=True, head_node_args=head)
        for _ in range(2):
            cluster.add_node(num_cpus=per_node)
        ray.init(address=cluster.address, include_dashboard=False, log_to_driver=False)
        out["nodes"] = len([n for n in ray.nodes() if n["Alive"]])
    else:
        start_local_ray(
            num_cpus=args.num_workers + 1,
            include_dashboard=False,
            log_to_driver=False,
            _system_config=nice0,
        )
    worker_ids = [f"w{i}" for i in range(args.num_workers)]
    placement = initial_placement(experts, worker_ids, len(experts))
    handles, addresses = {}, {}
    try:
        for wid in worker_ids:
            handles[wid], addresses[wid] = start_worker(
                wid,
                model_dir,
                len(experts),
                dtype=args.dtype,
                experts_to_load=[tuple(e) for e, ws in placement.items() if wid in ws],
            )
        expert_map = ExpertMap(1, placement, addresses)
        engine = LLMEngine(
            cfg,
            expert_backend=lambda r, m, d, dev: TimedBackend(
                ExpertRouter(
                    expert_map,
                    d,
                    m.config.hidden_size,
                    RouterConfig(node_streams=args.transport == "node"),
                )
            ),
        )
        router = engine.model.experts.inner
        for batch in batches:
            out["results"][batch] = {}
            for micro_batches in [int(m) for m in args.micro_batches.split(",")]:
                # the same engine and workers: only the runner's split changes
                engine.runner.micro_batches = micro_batches
                measure(engine, batch, 3, args.prompt_len)
                before = worker_compute_seconds(handles.values())
                before_router = router_compute(router)
                res = measure(engine, batch, args.steps, args.prompt_len)
                res["worker_compute_ms"] = (
                    1e3 * (worker_compute_seconds(handles.values()) - before) / args.steps
                )
                after_router = router_compute(router)
                if before_router is not None and after_router is not None:
                    res["critical_compute_ms"] = (
                        1e3 * (after_router[0] - before_router[0]) / args.steps
                    )
                out["results"][batch][micro_batches] = res
        router.close()
    finally:
        for h in handles.values():
            ray.kill(h)
        ray.shutdown()
        if cluster is not None:
            cluster.shutdown()
    return out


def spawn(mode: str, args: argparse.Namespace, model_dir: Path) -> dict:
    """Run one mode in a fresh process so their thread settings do not mix."""
    env = dict(os.environ)
    if mode == "distributed":
        # the engine blocks on RPCs; spinning OpenMP threads would steal the workers' cores
        env["OMP_WAIT_POLICY"] = "PASSIVE"
        # as a deployment runs it (an engine actor of num_cpus 1 gets Ray's
        # OMP_NUM_THREADS=1): sleeping OpenMP threads woken for every op cost more than
        # a second thread gives back while the workers share the cores
        env["OMP_NUM_THREADS"] = str(args.distributed_engine_threads)
    cmd = [
        sys.executable,
        __file__,
        "--run",
        mode,
        "--model-dir",
        str(model_dir),
        "--batch-sizes",
        args.batch_sizes,
        "--steps",
        str(args.steps),
        "--prompt-len",
        str(args.prompt_len),
        "--dtype",
        args.dtype,
        "--num-workers",
        str(args.num_workers),
        "--micro-batches",
        args.micro_batches,
        "--micro-batch-min-seqs",
        str(args.micro_batch_min_seqs),
        *(["--cluster"] if args.cluster else []),
        "--transport",
        args.transport,
    ]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"{mode} run failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout)


def compare(local: dict, dist: dict, args: argparse.Namespace, num_moe_layers: int) -> list:
    """One round's rows: per batch size, local against each micro-batch setting."""
    results = []
    for batch in [int(b) for b in args.batch_sizes.split(",")]:
        loc = local["results"][str(batch)]
        row: dict = {
            "batch_size": batch,
            "local_step_ms": round(loc["step_ms"], 3),
            "p50_local_step_ms": round(loc["p50_step_ms"], 3),
        }
        row["local_expert_ms_per_step"] = round(loc["expert_backend_ms"], 3)
        for mb, dst in dist["results"][str(batch)].items():
            compute_ms = dst["worker_compute_ms"]
            # the critical path: the slowest worker of each layer call (else the old estimate)
            critical_ms = dst.get("critical_compute_ms", compute_ms / args.num_workers)
            row[f"micro_batches_{mb}"] = {
                "distributed_step_ms": round(dst["step_ms"], 3),
                "p50_distributed_step_ms": round(dst["p50_step_ms"], 3),
                "ratio_distributed_over_local": round(dst["step_ms"] / loc["step_ms"], 3),
                # medians: one stalled step (a GC pause, a page-fault burst) moves the means
                "p50_ratio_distributed_over_local": round(
                    dst["p50_step_ms"] / loc["p50_step_ms"], 3
                ),
                "expert_calls_per_layer_step": round(dst["calls_per_layer_step"], 3),
                "router_ms_per_step": round(dst["expert_backend_ms"], 3),
                "worker_compute_ms_per_step": round(compute_ms, 3),
                "critical_path_compute_ms_per_step": round(critical_ms, 3),
                "critical_path_measured": "critical_compute_ms" in dst,
                "dispatch_overhead_ms_per_layer": round(
                    (dst["expert_backend_ms"] - critical_ms) / num_moe_layers, 3
                ),
            }
        one, two = row.get("micro_batches_1"), row.get("micro_batches_2")
        if one and two:
            row["pingpong_speedup"] = round(
                one["distributed_step_ms"] / two["distributed_step_ms"], 3
            )
        results.append(row)
    return results


def median_rows(rounds: list[list[dict]]) -> list[dict]:
    """The rounds' rows merged: each number the median over the rounds; each p50 ratio also
    as its [min, max] over the rounds (``p50_ratio_range``)."""

    def merge(values: list):
        first = values[0]
        if isinstance(first, dict):
            out = {k: merge([v[k] for v in values]) for k in first}
            if "p50_ratio_distributed_over_local" in first:
                ratios = [v["p50_ratio_distributed_over_local"] for v in values]
                out["p50_ratio_range"] = [min(ratios), max(ratios)]
            return out
        if isinstance(first, bool) or not isinstance(first, (int, float)):
            return first
        if all(v == first for v in values):  # the batch size, a count
            return first
        return round(statistics.median(values), 3)

    return [merge(list(rows)) for rows in zip(*rounds, strict=True)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--arch", default="mixtral")
    ap.add_argument("--preset", default="small")
    ap.add_argument("--batch-sizes", default="1,8,32,128")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--prompt-len", type=int, default=16)
    ap.add_argument("--num-workers", type=int, default=2)
    ap.add_argument(
        "--dtype",
        choices=["float32", "bfloat16"],
        default="float32",
        help="bfloat16: the CPU expert kernel runs in the engine and in the workers",
    )
    ap.add_argument("--cluster", action="store_true", help="workers on a local 3-node cluster")
    ap.add_argument(
        "--transport",
        choices=["node", "grpc"],
        default="node",
        help="node: frames to the workers' node streams (the default where the workers share "
        "the engine's node, as here); grpc: every frame over gRPC ForwardStream",
    )
    ap.add_argument(
        "--micro-batches",
        default="1,2",
        help="distributed runs: micro-batches per step to measure (1, 2 or 1,2)",
    )
    ap.add_argument(
        "--micro-batch-min-seqs",
        type=int,
        default=0,
        help="split only with this many sequences per micro-batch (0: EngineConfig's default)",
    )
    ap.add_argument(
        "--distributed-engine-threads",
        type=int,
        default=1,
        help="torch threads of the distributed engine (a deployment's engine actor: 1); the "
        "local engine keeps torch's default, all cores",
    )
    ap.add_argument(
        "--rounds",
        type=int,
        default=1,
        help="run local and distributed this many times, alternating; report medians",
    )
    ap.add_argument("--run", choices=["local", "distributed"], help=argparse.SUPPRESS)
    ap.add_argument("--model-dir", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.rounds < 1:
        ap.error(f"--rounds must be >= 1, got {args.rounds}")
    if args.run:
        print(json.dumps(run_mode(args)))
        return

    rounds = []
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = init_model(args.arch, args.preset, Path(tmp) / "m")
        mc = load_config(model_dir)
        num_moe_layers = len(mc.moe_layers)
        # local and distributed alternate, round after round: on a shared machine one run of
        # each can land in a fast and a slow minute of its neighbours' load
        for r in range(args.rounds):
            label = f"round {r + 1}/{args.rounds}: " if args.rounds > 1 else ""
            with console.status(f"{label}local (experts in-process)"):
                local = spawn("local", args, model_dir)
            with console.status(f"{label}distributed (experts on {args.num_workers} workers)"):
                dist = spawn("distributed", args, model_dir)
            rounds.append(compare(local, dist, args, num_moe_layers))
    results = rounds[0] if len(rounds) == 1 else median_rows(rounds)
    for row in results:
        console.print(row)
    emit_json(
        {
            "benchmark": "dispatch",
            "model": {
                "arch": args.arch,
                "preset": args.preset,
                "moe_layers": num_moe_layers,
                "experts_per_layer": mc.num_experts,
                "top_k": mc.top_k,
                "hidden_size": mc.hidden_size,
            },
            "num_workers": args.num_workers,
            "transport": args.transport,
            "dtype": args.dtype,
            "micro_batch_min_seqs": dist["micro_batch_min_seqs"],
            "cluster_nodes": dist.get("nodes", 1),
            "steps_timed": args.steps,
            "rounds": args.rounds,
            "torch_threads": {
                "local": local["torch_threads"],
                "distributed_engine": dist["torch_threads"],
                "worker": 1,
            },
            "note": "each mode runs in its own process (distributed with OMP_WAIT_POLICY=PASSIVE); "
            "dispatch overhead = (router time per step - critical-path compute per step) / moe "
            "layers; critical path = the slowest worker's compute of each layer call (measured "
            "when critical_path_measured, else summed worker compute / num_workers); "
            "worker_compute_ms_per_step is summed over workers, which run in parallel; "
            "micro_batches_N: the distributed engine with N micro-batches per step (same "
            "workers, same run); with 2, router_ms_per_step is the time the engine spends in "
            "submit and wait (blocked), so overlap shows as a smaller figure; "
            "pingpong_speedup = step time with 1 / step time with 2; with rounds > 1 every "
            "figure is the median over the rounds (local and distributed alternate), with "
            "the range of the p50 ratio beside it, and per_round holds each round's rows",
            "results": results,
            **({"per_round": rounds} if len(rounds) > 1 else {}),
        }
    )


if __name__ == "__main__":
    main()
