"""Elastic scaling, measured: how fast, and what serving feels during it.

(a) time from decision to serving for: replicating the hottest experts, adding
    a worker from a ready spare and adding one without a spare (a process start);
    baselines: a cold restart of the whole deployment in its new shape (no spare),
    and adding a full second deployment (engine + all experts), which is how
    replica-level systems scale.
(b) a series of scaling operations under steady closed-loop streaming load:
    failed requests, output throughput and p99 inter-token latency in windows of
    operations vs steady windows of the same length right before them (same
    clients, same load). With worker operations the window includes adding a
    worker (it takes the spare), replica loads onto it, removing it, and the
    spare's refill (a process start) until the spare is ready again.
    ``--background-priority normal`` runs the old behaviour (loads, copies and
    worker start-up at serving's priority) for a before/after comparison.
(c) a replay of the Azure conversation trace, time-compressed and scaled
    down, with the autoscaler on vs a fixed placement of the same average size:
    SLO attainment and worker-seconds (every running worker process counts,
    spares included; the fixed baseline runs no spare).

Prints one JSON document on stdout; progress on stderr.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import ray

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import DEFAULT_TRACE, LengthScaling, console, emit_json, load_trace, select_rows

from elasticmoe import SamplingParams
from elasticmoe.control.cluster import start_local_ray
from elasticmoe.control.deployment import Deployment, DeploymentConfig
from elasticmoe.core.stats import percentile
from elasticmoe.model.init_model import init_model


def p99(values: list[float]) -> float:
    """99th percentile (nearest rank, :func:`elasticmoe.core.stats.percentile`); nan if none."""
    value = percentile(values, 99)
    return float("nan") if value is None else value


def cpu_seconds() -> tuple[float, float]:
    """Busy CPU seconds since boot: ``(whole machine, this benchmark's process tree)``.

    The tree is this process and its descendants (Ray's raylet, GCS and every actor
    process of a local instance); a reaped child's time is in its parent's
    ``cutime``. The difference is other people's load on a shared machine, which
    each window reports so that a dip from noise is not taken for one from scaling.
    """
    hz = os.sysconf("SC_CLK_TCK")
    with open("/proc/stat") as f:
        fields = [int(x) for x in f.readline().split()[1:]]
    machine = (sum(fields) - fields[3] - fields[4]) / hz  # all but idle and iowait
    parent: dict[int, int] = {}
    ticks: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                stat = f.read().rsplit(")", 1)[1].split()
        except OSError:  # exited meanwhile
            continue
        parent[int(entry)] = int(stat[1])
        ticks[int(entry)] = sum(int(x) for x in stat[11:15])  # utime stime cutime cstime
    mine = {os.getpid()}
    grew = True
    while grew:
        new = {p for p, pp in parent.items() if pp in mine and p not in mine}
        mine |= new
        grew = bool(new)
    return machine, sum(ticks.get(p, 0) for p in mine) / hz


class StreamingLoad:
    """N closed-loop clients streaming from the engines; records token arrival times."""

    def __init__(self, engines: list[Any], num_clients: int, max_tokens: int, prompt_len: int):
        self.engines = engines
        self.num_clients = num_clients
        self.params = SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True)
        self.prompt_len = prompt_len
        self.tokens: list[float] = []  # arrival time of every output token
        self.gaps: list[tuple[float, float]] = []  # (time, inter-token gap)
        self.ttfts: list[tuple[float, float]] = []
        self.completed = self.failed = 0
        self.errors: list[str] = []
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._threads = [
            threading.Thread(target=self._client, args=(i,), daemon=True)
            for i in range(num_clients)
        ]

    def _client(self, i: int) -> None:
        n = 0
        while not self._stop.is_set():
            engine = self.engines[(i + n) % len(self.engines)]
            prompt = {
                "prompt_token_ids": [(i * 31 + n * 7 + j) % 400 + 5 for j in range(self.prompt_len)]
            }
            n += 1
            start = last = time.monotonic()
            got = 0
            try:
                for ref in engine.generate_stream.options(num_returns="streaming").remote(
                    prompt, self.params
                ):
                    out = ray.get(ref)
                    now = time.monotonic()
                    new = len(out.outputs[0].token_ids) - got
                    got += new
                    with self._lock:
                        self.tokens.extend([now] * new)
                        if got == new:
                            self.ttfts.append((now, now - start))
                        else:
                            self.gaps.append((now, now - last))
                    last = now
                    if out.finished and out.outputs[0].finish_reason != "length":
                        raise RuntimeError(out.outputs[0].stop_reason)
                with self._lock:
                    self.completed += 1
            except Exception as e:
                with self._lock:
                    self.failed += 1
                    self.errors.append(repr(e)[:200])

    def start(self) -> StreamingLoad:
        for t in self._threads:
            t.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(120)

    def window(self, start: float, end: float) -> dict[str, float]:
        """Throughput and latency within [start, end)."""
        return self.windows([(start, end)])

    def windows(self, spans: list[tuple[float, float]]) -> dict[str, float]:
        """Throughput and latency over the union of disjoint [start, end) spans."""

        def inside(t: float) -> bool:
            return any(a <= t < b for a, b in spans)

        with self._lock:
            toks = sum(1 for t in self.tokens if inside(t))
            gaps = [g for t, g in self.gaps if inside(t)]
        seconds = sum(b - a for a, b in spans)
        return {
            "seconds": round(seconds, 2),
            "output_tokens_per_s": round(toks / max(seconds, 1e-9), 2),
            "p99_itl_ms": round(1e3 * p99(gaps), 2),
            "mean_itl_ms": round(1e3 * statistics.mean(gaps), 2) if gaps else None,
        }


def start_deployment(cfg: DeploymentConfig) -> tuple[Deployment, float]:
    start = time.monotonic()
    dep = Deployment(cfg, progress=False).start()
    return dep, time.monotonic() - start


def hottest_experts(dep: Deployment, n: int) -> list[str]:
    # status() reports the engines' load as the controller's health loop last saw it
    deadline = time.monotonic() + 60
    load: dict[str, float] = {}
    while not any(load.values()) and time.monotonic() < deadline:
        load = ray.get(dep.controller.status.remote())["expert_load"]
        time.sleep(0.2)
    return [e for e, _ in sorted(load.items(), key=lambda kv: -kv[1])[:n]]


def wait_for_spare(dep: Deployment, timeout_s: float = 600.0, poll_s: float = 0.5) -> bool:
    """Wait until the controller reports a started spare worker (True), or give up.

    Polls gently: in (b) it runs inside the measured window, and status() is not free.
    """
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if ray.get(dep.controller.status.remote())["spare_workers"]:
            return True
        time.sleep(poll_s)
    return False


def part_a(base: DeploymentConfig, args) -> dict[str, Any]:
    """Scale-up latency: replicate/add-worker vs cold restart vs a second full replica."""
    dep, cold_start_s = start_deployment(base)
    try:
        dep.generate(
            [{"prompt_token_ids": list(range(5, 40))}] * 4,
            [SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)] * 4,
        )
        hot = hottest_experts(dep, args.hot_experts)
        t = time.monotonic()
        for expert in hot:
            ray.get(dep.controller.replicate.remote(expert))
        replicate_s = time.monotonic() - t
        spare = bool(base.spare_workers) and wait_for_spare(dep)
        t = time.monotonic()
        ray.get(dep.controller.add_worker.remote())
        add_worker_s = time.monotonic() - t
        new_shape = base.model_copy(
            update={
                "name": "cold",
                "num_workers": base.num_workers + 1,
                "spare_workers": 0,
                "expert_replicas": {e: 2 for e in hot},
            }
        )
    finally:
        dep.shutdown()
    cold, cold_s = start_deployment(new_shape)
    try:
        # spare_workers=0: this add_worker starts a worker process first
        t = time.monotonic()
        ray.get(cold.controller.add_worker.remote())
        add_worker_no_spare_s = time.monotonic() - t
    finally:
        cold.shutdown()
    second, second_s = start_deployment(
        base.model_copy(update={"name": "second", "spare_workers": 0})
    )
    second.shutdown()
    return {
        "replicate_hottest_experts": {
            "experts": hot,
            "seconds": round(replicate_s, 3),
            "seconds_per_expert": round(replicate_s / len(hot), 3),
        },
        "add_worker_from_spare_seconds" if spare else "add_worker_seconds": round(add_worker_s, 3),
        "add_worker_without_spare_seconds": round(add_worker_no_spare_s, 3),
        "cold_restart_new_shape_seconds": round(cold_s, 3),
        "second_full_replica_seconds": round(second_s, 3),
        "initial_start_seconds": round(cold_start_s, 3),
        "speedup_replicate_vs_cold_restart": round(cold_s / replicate_s, 1),
        "speedup_add_worker_vs_cold_restart": round(cold_s / add_worker_s, 1),
        "speedup_add_worker_without_spare_vs_cold_restart": round(
            cold_s / add_worker_no_spare_s, 1
        ),
        "baseline": "cold restart: a deployment in the new shape started from nothing "
        "(no spare), until its engines answer; second full replica: a whole second "
        "deployment, how replica-level systems scale. add_worker is timed both from a ready "
        "spare (a started, empty worker the controller keeps; it costs a process, counted "
        "in (c)) and without one (a process start, the like-for-like comparison)",
        "spare_was_ready": spare,
        "speedup_replicate_vs_second_replica": round(second_s / replicate_s, 1),
        "note": "seconds from the decision (controller call) until the new epoch is served and "
        "the old one drained; cold restart = shutdown excluded, start of a deployment in "
        "the new shape until its engines answer",
    }


def _operations_window(dep: Deployment, args, cycle: int) -> list[dict[str, Any]]:
    """One series of scaling operations, spread over the first half of a window.

    With worker operations: add a worker first (it takes the spare, so the spare's
    refill, a process start, runs inside the window), replicate/migrate/evict
    (replica loads onto the new worker are peer-to-peer copies), remove the worker
    again (its replicas move off it), and wait until the spare is back.
    """
    c = dep.controller
    ops: list[dict[str, Any]] = []
    experts = sorted(dep.expert_map.replicas, key=str)
    steps = 3 * args.rounds + (2 if args.worker_ops else 0)
    gap = args.steady_s / 2 / max(steps, 1)
    added = None
    if args.worker_ops:
        added = ray.get(c.add_worker.remote())
        ops.append(added)
        time.sleep(gap)
    for i in range(args.rounds):
        j = 3 * (i + cycle * args.rounds)
        x1, x2 = experts[j % len(experts)], experts[(j + 1) % len(experts)]
        ops.append(ray.get(c.replicate.remote(str(x1))))
        time.sleep(gap)
        ops.append(ray.get(c.migrate.remote(str(x2), dep.expert_map.replicas_of(x2)[0])))
        time.sleep(gap)
        ops.append(ray.get(c.evict.remote(str(x1), dep.expert_map.replicas_of(x1)[0])))
        time.sleep(gap)
    if added is not None:
        ops.append(ray.get(c.remove_worker.remote(added["add_workers"][0])))
    return ops


def part_b(base: DeploymentConfig, args) -> dict[str, Any]:
    """Throughput and ITL in a steady window vs an equally long window of scaling operations.

    The same closed-loop clients run throughout; each cycle is a steady window of
    ``steady_s`` followed by an operations window of ``steady_s`` (longer only if the
    spare is not back by then: the window always ends with the deployment in its
    steady shape again, spare included). Figures pool the cycles.
    """
    dep, _ = start_deployment(
        base.model_copy(
            update={
                "name": "load",
                "max_workers": 8,
                "background_priority": args.background_priority,
            }
        )
    )
    load = StreamingLoad(dep.engines, args.clients, args.max_tokens, args.prompt_len)
    ops: list[dict[str, Any]] = []
    windows: list[tuple[str, float, float]] = []
    others: list[float] = []  # cores busy with other people's processes, per window
    try:
        if base.spare_workers and args.worker_ops:
            wait_for_spare(dep)
        load.start()
        time.sleep(args.warmup_s)
        for cycle in range(args.cycles):
            start, cpu0 = time.monotonic(), cpu_seconds()
            time.sleep(args.steady_s)
            end, cpu1 = time.monotonic(), cpu_seconds()
            windows.append(("steady", start, end))
            others.append((cpu1[0] - cpu1[1] - cpu0[0] + cpu0[1]) / (end - start))
            start, cpu0 = end, cpu1
            failed_before = load.failed
            ops.extend(_operations_window(dep, args, cycle))
            # the window ends no earlier than steady_s, and not before the spare is back
            spare_back = not (base.spare_workers and args.worker_ops) or wait_for_spare(dep)
            time.sleep(max(0.0, start + args.steady_s - time.monotonic()))
            end, cpu1 = time.monotonic(), cpu_seconds()
            windows.append(("during", start, end))
            others.append((cpu1[0] - cpu1[1] - cpu0[0] + cpu0[1]) / (end - start))
            console.print(
                f"cycle {cycle}: steady {load.window(*windows[-2][1:])}, "
                f"during {load.window(*windows[-1][1:])}, "
                f"failed {load.failed - failed_before}, spare back {spare_back}, "
                f"other processes' cores {others[-2]:.2f} / {others[-1]:.2f}"
            )
    finally:
        load.stop()
        dep.shutdown()
    steady = load.windows([(a, b) for k, a, b in windows if k == "steady"])
    during = load.windows([(a, b) for k, a, b in windows if k == "during"])
    return {
        "clients": args.clients,
        "cycles": args.cycles,
        "background_priority": args.background_priority,
        "worker_ops": args.worker_ops,
        "operations": [
            {"kind": o["kind"], "seconds": o["seconds"], "epoch": o["epoch"]} for o in ops
        ],
        "requests_completed": load.completed,
        "requests_failed": load.failed,
        "errors": load.errors[:5],
        "steady": steady,
        "during": during,
        "per_cycle": [
            {
                kind: {**load.window(a, b), "other_processes_cores": round(other, 2)}
                for (kind, a, b), other in zip(windows[i : i + 2], others[i : i + 2], strict=True)
            }
            for i in range(0, len(windows), 2)
        ],
        "other_processes_cores": {
            kind: round(statistics.mean(others[first::2]), 2)
            for first, kind in enumerate(("steady", "during"))
        },
        "throughput_during_over_steady": round(
            during["output_tokens_per_s"] / max(steady["output_tokens_per_s"], 1e-9), 3
        ),
        "p99_itl_during_over_steady": round(during["p99_itl_ms"] / steady["p99_itl_ms"], 3),
        "baseline": "the same deployment, clients and load in a steady window of the same "
        "length right before each operations window; the operations window lasts until the "
        "spare is back (its refill counts); requests_failed counts every failed request; "
        "other_processes_cores: the machine's busy cores outside this benchmark's processes "
        "(a shared machine: compare windows with like values)",
    }


REPLAY_POLICY = """
apiVersion: elasticmoe.io/v1alpha1
kind: AutoscalingPolicy
metadata: {{name: bench-replay}}
spec:
  interval_s: 2
  window_s: 6
  experts: {{hot_threshold: 1.5, cold_threshold: 0.3, min_replicas: 1, max_replicas: 3,
            replicate_cooldown_s: 6, evict_cooldown_s: 20, max_actions_per_interval: 4}}
  rebalance: {{enabled: true, min_balancedness: 0.8, max_moves_per_interval: 4, cooldown_s: 10}}
  pools:
    - {{name: default, accelerator: cpu, min_workers: {min_workers}, max_workers: {max_workers},
       slots_per_worker: {slots}, scale_up_cooldown_s: 10, scale_down_cooldown_s: 20,
       scale_down_utilization: 0.3}}
  slo: {{ttft_p99_ms: {ttft_ms}, itl_p99_ms: {itl_ms}, window_s: 6}}
"""


def replay(
    dep: Deployment,
    arrivals: list[tuple[float, int, int]],
    slo: dict[str, float],
    sample_s: float = 1.0,
) -> dict[str, Any]:
    """Open-loop replay: each request streams from an engine at its arrival time."""
    results: list[dict[str, float]] = []
    lock = threading.Lock()
    workers_samples: list[tuple[float, int]] = []
    stop = threading.Event()

    def running_workers() -> int:
        # every worker process: in the map and spares (a spare is a process that costs)
        return len(ray.get(dep.controller.demand.remote())["workers"])

    def sample_workers() -> None:
        while not stop.wait(sample_s):
            try:
                n = running_workers()
            except Exception:
                continue
            workers_samples.append((time.monotonic(), n))

    def one(i: int, prompt_len: int, output_len: int) -> None:
        engine = dep.engines[i % len(dep.engines)]
        params = SamplingParams(max_tokens=output_len, temperature=0, ignore_eos=True)
        prompt = {"prompt_token_ids": [(i * 13 + j) % 400 + 5 for j in range(prompt_len)]}
        start = last = time.monotonic()
        ttft, gaps, got, ok = None, [], 0, False
        try:
            for ref in engine.generate_stream.options(num_returns="streaming").remote(
                prompt, params
            ):
                out = ray.get(ref)
                now = time.monotonic()
                n = len(out.outputs[0].token_ids)
                if n > got:
                    if ttft is None:
                        ttft = now - start
                    else:
                        gaps.append(now - last)
                    got, last = n, now
                ok = out.finished and out.outputs[0].finish_reason == "length"
        except Exception:
            ok = False
        with lock:
            results.append(
                {
                    "ok": ok,
                    "ttft": ttft or float("inf"),
                    "itl": statistics.mean(gaps) if gaps else 0.0,
                }
            )

    sampler = threading.Thread(target=sample_workers, daemon=True)
    sampler.start()
    t0 = time.monotonic()
    threads = []
    for i, (at, plen, olen) in enumerate(arrivals):
        delay = t0 + at - time.monotonic()
        if delay > 0:
            time.sleep(delay)
        th = threading.Thread(target=one, args=(i, plen, olen), daemon=True)
        th.start()
        threads.append(th)
    for th in threads:
        th.join(300)
    end = time.monotonic()
    stop.set()
    sampler.join(5)
    worker_seconds = 0.0
    prev_t, prev_n = t0, running_workers()
    for t, n in workers_samples:
        worker_seconds += (t - prev_t) * prev_n
        prev_t, prev_n = t, n
    worker_seconds += (end - prev_t) * prev_n
    met = [
        r["ok"] and r["ttft"] * 1e3 <= slo["ttft_ms"] and r["itl"] * 1e3 <= slo["itl_ms"]
        for r in results
    ]
    return {
        "requests": len(results),
        "failed": sum(not r["ok"] for r in results),
        "slo_attainment": round(sum(met) / max(len(met), 1), 3),
        "p99_ttft_ms": round(1e3 * p99([r["ttft"] for r in results]), 1),
        "p99_mean_itl_ms": round(1e3 * p99([r["itl"] for r in results]), 1),
        "wall_seconds": round(end - t0, 1),
        "worker_seconds": round(worker_seconds, 1),  # spare processes included
        "mean_workers": round(worker_seconds / (end - t0), 2),
        "max_workers": max([n for _, n in workers_samples], default=prev_n),
    }


def part_c(base: DeploymentConfig, args, tmp: Path) -> dict[str, Any]:
    """Trace replay with the autoscaler vs a fixed placement of the same average size."""
    rows = load_trace(args.trace)
    # 10 trace-minutes starting at a seeded row, every k-th request, compressed in time
    first = select_rows(rows, 1, seed=args.seed)[0]
    t_start = rows[first].timestamp
    window = [r for r in rows[first:] if r.timestamp - t_start < args.trace_minutes * 60]
    kept = window[:: args.keep_every]
    scaling = LengthScaling(context_divisor=16, prompt_max=64, generated_divisor=8, output_max=32)
    arrivals = [
        (
            (r.timestamp - t_start) / args.time_compression,
            scaling.prompt_len(r.context_tokens),
            scaling.output_len(r.generated_tokens),
        )
        for r in kept
    ]
    slo = {"ttft_ms": args.slo_ttft_ms, "itl_ms": args.slo_itl_ms}
    policy = tmp / "replay-policy.yaml"
    policy.write_text(
        REPLAY_POLICY.format(
            min_workers=base.num_workers,
            max_workers=base.num_workers + 2,
            slots=64,
            ttft_ms=slo["ttft_ms"],
            itl_ms=slo["itl_ms"],
        )
    )
    auto_cfg = base.model_copy(
        update={
            "name": "auto",
            "policy": str(policy),
            "slots_per_worker": 64,
            "max_workers": base.num_workers + 2,
        }
    )
    dep, _ = start_deployment(auto_cfg)
    try:
        auto = replay(dep, arrivals, slo)
        auto["actions"] = [h["kind"] for h in ray.get(dep.controller.status.remote())["history"]]
    finally:
        dep.shutdown()
    fixed_workers = max(1, round(auto["mean_workers"]))  # the mean counts spares too
    dep, _ = start_deployment(
        base.model_copy(
            update={
                "name": "fixed",
                "num_workers": fixed_workers,
                "slots_per_worker": 64,
                "spare_workers": 0,  # a fixed placement never adds a worker
            }
        )
    )
    try:
        fixed = replay(dep, arrivals, slo)
    finally:
        dep.shutdown()
    return {
        "trace_window": {
            "start_row": first,
            "trace_minutes": args.trace_minutes,
            "requests_in_window": len(window),
            "keep_every": args.keep_every,
            "requests_replayed": len(arrivals),
            "time_compression": args.time_compression,
            "length_scaling": {
                "prompt": "clamp(ceil(ctx/16), 4, 64)",
                "output": "clamp(ceil(gen/8), 4, 32)",
            },
        },
        "slo": slo,
        "autoscaler": auto,
        "fixed": {**fixed, "workers": fixed_workers},
        "slo_attainment_auto_minus_fixed": round(
            auto["slo_attainment"] - fixed["slo_attainment"], 3
        ),
        "worker_seconds_auto_over_fixed": round(
            auto["worker_seconds"] / fixed["worker_seconds"], 3
        ),
        "baseline": "a fixed placement (no autoscaler, no spare) with as many workers as the "
        "autoscaled run's mean, spares included; worker-seconds count every running worker "
        "process, spares included",
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--arch", default="mixtral")
    ap.add_argument("--preset", default="small")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--hot-experts", type=int, default=4)
    ap.add_argument(
        "--spare-workers",
        type=int,
        default=1,
        help="started, empty workers kept ready (0: add_worker starts a process)",
    )
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--max-tokens", type=int, default=48)
    ap.add_argument("--prompt-len", type=int, default=24)
    ap.add_argument("--warmup-s", type=float, default=5)
    ap.add_argument(
        "--steady-s", type=float, default=20, help="(b): length of each steady and ops window"
    )
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--cycles", type=int, default=2, help="(b): steady + operations window pairs")
    ap.add_argument(
        "--background-priority",
        default="idle",
        choices=["idle", "low", "normal"],
        help="(b): the deployment's background_priority (normal: the old behaviour)",
    )
    ap.add_argument(
        "--no-worker-ops",
        dest="worker_ops",
        action="store_false",
        help="(b): only replicate/migrate/evict, no add/remove worker",
    )
    ap.add_argument("--parts", default="a,b,c")
    ap.add_argument("--trace", default=str(DEFAULT_TRACE))
    ap.add_argument("--trace-minutes", type=float, default=10)
    ap.add_argument("--time-compression", type=float, default=10)
    ap.add_argument("--keep-every", type=int, default=12, help="replay every k-th request")
    ap.add_argument("--slo-ttft-ms", type=float, default=2000)
    ap.add_argument("--slo-itl-ms", type=float, default=250)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    parts = set(args.parts.split(","))

    result: dict[str, Any] = {
        "benchmark": "scaling",
        "model": {"arch": args.arch, "preset": args.preset},
        "workers": args.workers,
        "spare_workers": args.spare_workers,
        "machine_note": "2 CPU cores shared by every process (engine, workers, clients, Ray)",
    }
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = init_model(args.arch, args.preset, Path(tmp) / "m")
        start_local_ray(
            num_cpus=16,
            include_dashboard=False,
            namespace="elasticmoe",
            log_to_driver=False,
            # the actors at the priority a deployment's own Ray gives them
            _system_config={"worker_niceness": 0},
        )
        base = DeploymentConfig(
            model=str(model_dir),
            num_workers=args.workers,
            name="base",
            spare_workers=args.spare_workers,
        )
        try:
            if "a" in parts:
                with console.status("(a) scale-up latency"):
                    result["a_scale_up_latency"] = part_a(base, args)
                console.print(result["a_scale_up_latency"])
            if "b" in parts:
                with console.status("(b) scaling under steady load"):
                    result["b_scaling_under_load"] = part_b(base, args)
                console.print(result["b_scaling_under_load"])
            if "c" in parts:
                with console.status("(c) trace replay, autoscaler vs fixed"):
                    result["c_trace_replay"] = part_c(base, args, Path(tmp))
                console.print(result["c_trace_replay"])
        finally:
            ray.shutdown()
    emit_json(result)


if __name__ == "__main__":
    main()
