"""Chaos benchmark: every fault scenario under steady load on a local 3-node Ray cluster.

Starts ``ray.cluster_utils.Cluster`` (3 raylets on 127.0.0.1), a real
``redis-server`` for the state store (``make redis`` installs it) and a
deployment of 3 expert workers (every expert on 2), 1 spare worker and 2
engines; then runs each scenario of :mod:`elasticmoe.chaos.scenarios` in
turn and prints one JSON document: per scenario, requests sent / completed /
failed / lost, greedy outputs differing from the fault-free run, time until
full redundancy, and p99 inter-token latency and throughput during the faults
as ratios to the fault-free baseline measured just before, in the same run.

    python bench/chaos.py --out chaos.json
    python bench/chaos.py --scenarios worker-kill --duration 60
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

from common import REPO_ROOT, console, emit_json

from elasticmoe.chaos import SCENARIOS, run_scenario
from elasticmoe.chaos.cluster import DRILL_DEPLOYMENT, drill
from elasticmoe.model.init_model import init_model

sys.path.insert(0, str(REPO_ROOT / "tests"))
from redis_server import RedisServer  # the tests' real redis-server helper

# node loss last: the drill replaces the node, but the cluster is then one node younger
ORDER = [
    "slow-worker",
    "engine-kill",
    "redis-outage",
    "controller-kill",
    "worker-kill",
    "node-loss",
]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--scenarios", default=",".join(ORDER), help="comma-separated, run in order")
    ap.add_argument("--arch", default="mixtral")
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--duration", type=float, default=20, help="seconds of faults per scenario")
    ap.add_argument("--worker-kill-duration", type=float, default=60)
    ap.add_argument("--interval", type=float, default=10, help="worker-kill: seconds between")
    ap.add_argument("--baseline", type=float, default=8, help="fault-free seconds first")
    ap.add_argument("--concurrency", type=int, default=4)
    ap.add_argument("--delay-ms", type=float, default=200)
    ap.add_argument(
        "--out", help="also write the JSON here (Ray prints node-loss notices on stdout)"
    )
    args = ap.parse_args()
    scenarios = args.scenarios.split(",")
    unknown = [s for s in scenarios if s not in SCENARIOS]
    if unknown:
        ap.error(f"unknown scenario(s) {unknown}; known: {', '.join(SCENARIOS)}")

    results = {}
    with tempfile.TemporaryDirectory() as tmp, RedisServer(persist=True) as redis:
        ckpt = init_model(args.arch, args.preset, Path(tmp) / "ckpt")
        console.print("starting a 3-node Ray cluster and the deployment")
        with drill(str(ckpt), redis=redis) as injector:
            for name in scenarios:
                duration = args.worker_kill_duration if name == "worker-kill" else args.duration
                with console.status(f"{name}") as status:
                    results[name] = run_scenario(
                        injector,
                        name,
                        duration,
                        before_s=args.baseline,
                        interval_s=args.interval,
                        delay_ms=args.delay_ms,
                        concurrency=args.concurrency,
                        log=lambda msg, s=status, n=name: s.update(f"{n}: {msg}"),
                    )
                r = results[name]
                console.print(
                    f"[bold]{name}[/bold]: {r['requests']['completed']}/{r['requests']['sent']} "
                    f"completed, {r['requests']['failed']} failed, {r['differing_outputs']} "
                    f"differing; restored in {r['time_to_full_redundancy_s']['max']} s; "
                    f"p99 ITL x{r['itl_p99_ms']['ratio']}, throughput "
                    f"x{r['throughput_tok_s']['ratio']}"
                )
    result = {
        "benchmark": "chaos",
        "model": {"arch": args.arch, "preset": args.preset},
        "cluster": {"nodes": 3, "cpus_per_node": 4, "state_store": "redis"},
        "deployment": DRILL_DEPLOYMENT,
        "load": {"streaming_clients": args.concurrency, "baseline_s": args.baseline},
        "machine_note": "2 CPU cores shared by 3 raylets, workers, engines and the clients",
        "scenarios": results,
    }
    emit_json(result)
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
