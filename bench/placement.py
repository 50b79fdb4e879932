"""Placement quality and weight moves: incremental ``rebalance`` vs from-scratch EPLB.

Two parts, both compared in the same run:

(a) The DeepSeek EPLB README example (2 layers x 12 experts, 16 replicas per layer,
    8 GPUs -> 8 workers x 4 slots). Balancedness (mean over layers of mean / max worker
    load) and replicas copied from a first placement (``initial_placement``, one replica
    per expert) for ``eplb_greedy`` and for ``rebalance``; EPLB's own published answer
    (hierarchical policy, from its README) is scored for reference.

(b) Drift. Synthetic Zipf loads (default 64 experts x 24 layers, 16 workers, 80 physical
    experts per layer, so 24 x 80 / 16 = 120 slots per worker: every slot is used).
    Each round, in every layer, the popularity ranks of a few experts are shuffled among
    themselves (the drift, cumulative) and every expert's load gets fresh log-normal
    noise (seeded). ``rebalance`` starts each round from its previous placement; the
    baseline re-places from scratch with ``eplb_greedy``. EPLB's worker labels carry no
    meaning (in a layer every worker gets the same number of replicas), so the fair
    baseline, the one the target is judged against, relabels them: per layer, EPLB's
    workers are matched to the previous placement's by a maximum-overlap assignment
    (Hungarian algorithm), which keeps its balancedness and slot use and copies only
    what the matching cannot keep. The raw EPLB (labels as it numbers them) is reported
    beside it. Each baseline's moves are counted against its own previous placement
    (what a system running it would copy). Round 0 places from ``initial_placement`` and
    is reported apart; the summary covers the drift rounds. Target: balancedness within
    0.02 of the relabelled baseline's with at most a fifth of its moves. A few shorter
    variations (noise level, spare slots) follow.

Prints JSON on stdout; progress on stderr.
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
from collections import Counter
from pathlib import Path
from typing import Any

from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import console, emit_json, timer

from elasticmoe.core.experts import LogicalExpert
from elasticmoe.core.placement import (
    Placement,
    WorkerSpec,
    balancedness,
    count_moves,
    eplb_greedy,
    initial_placement,
    rebalance,
    worker_layer_loads,
)

DEEPSEEK_WEIGHTS = [
    [90, 132, 40, 61, 104, 165, 39, 4, 73, 56, 183, 86],
    [20, 107, 104, 64, 19, 197, 187, 157, 172, 86, 16, 27],
]
# EPLB README output for the example (num_groups=4, num_nodes=2, num_gpus=8):
# physical expert -> logical expert; GPU g holds physical experts 2g and 2g+1
DEEPSEEK_PHY2LOG = [
    [5, 6, 5, 7, 8, 4, 3, 4, 10, 9, 10, 2, 0, 1, 11, 1],
    [7, 10, 6, 8, 6, 11, 8, 9, 2, 4, 5, 1, 5, 0, 3, 1],
]

BALANCE_MARGIN = 0.02  # the target: within 0.02 of the baseline's balancedness
MOVES_FRACTION = 0.2  # ... with at most a fifth of its moves


def max_weight_assignment(weight: list[list[float]]) -> list[int]:
    """``col[i]`` for each row ``i`` maximising ``sum(weight[i][col[i]])`` (square matrix).

    The Hungarian algorithm (shortest augmenting paths with potentials), O(n^3); n is
    the number of workers, so small.
    """
    n = len(weight)
    big = max((abs(x) for row in weight for x in row), default=0.0) + 1.0
    cost = [[big - x for x in row] for row in weight]  # minimise cost = maximise weight
    inf = float("inf")
    u, v = [0.0] * (n + 1), [0.0] * (n + 1)
    match = [0] * (n + 1)  # match[column] = row, 1-based; 0 = free
    way = [0] * (n + 1)
    for row in range(1, n + 1):
        match[0] = row
        col0 = 0
        minv = [inf] * (n + 1)
        used = [False] * (n + 1)
        while True:
            used[col0] = True
            r, delta, col1 = match[col0], inf, 0
            for col in range(1, n + 1):
                if used[col]:
                    continue
                cur = cost[r - 1][col - 1] - u[r] - v[col]
                if cur < minv[col]:
                    minv[col], way[col] = cur, col0
                if minv[col] < delta:
                    delta, col1 = minv[col], col
            for col in range(n + 1):
                if used[col]:
                    u[match[col]] += delta
                    v[col] -= delta
                else:
                    minv[col] -= delta
            col0 = col1
            if match[col0] == 0:
                break
        while col0:
            col1 = way[col0]
            match[col0] = match[col1]
            col0 = col1
    out = [0] * n
    for col in range(1, n + 1):
        out[match[col] - 1] = col - 1
    return out


def relabel_workers(new: Placement, prev: Placement, workers: list[WorkerSpec]) -> Placement:
    """``new`` with, per layer, its workers renamed to overlap ``prev`` the most.

    In a layer, worker ``a`` of ``new`` may take the name ``b`` only when both hold the
    same number of that layer's replicas in ``new``, so every worker's slot use (and
    each layer's balancedness) is exactly that of ``new``.
    """
    ids = [w.worker_id for w in workers]
    index = {w: i for i, w in enumerate(ids)}
    out: Placement = {}
    for layer in sorted({e.layer for e in new}):
        experts = [e for e in new if e.layer == layer]
        held_new = [set() for _ in ids]
        held_prev = [set() for _ in ids]
        for e in experts:
            for w in new[e]:
                held_new[index[w]].add(e)
            for w in prev.get(e, ()):
                held_prev[index[w]].add(e)
        forbidden = -float(len(experts) + 1) * len(ids)
        weight = [
            [
                float(len(held_new[a] & held_prev[b]))
                if len(held_new[a]) == len(held_new[b])
                else forbidden
                for b in range(len(ids))
            ]
            for a in range(len(ids))
        ]
        rename = {ids[a]: ids[b] for a, b in enumerate(max_weight_assignment(weight))}
        for e in experts:
            out[e] = tuple(rename[w] for w in new[e])
    return out


def per_layer_balancedness(
    placement: Placement, load: dict[LogicalExpert, float], workers: list[WorkerSpec]
) -> list[float]:
    """mean / max worker load of each layer (over all workers)."""
    ids = [w.worker_id for w in workers]
    out = []
    for _, per_worker in sorted(worker_layer_loads(placement, load).items()):
        loads = [per_worker.get(w, 0.0) for w in ids]
        out.append(round(sum(loads) / len(ids) / max(loads), 4) if max(loads) > 0 else 1.0)
    return out


def deepseek_example(tolerance: float) -> dict[str, Any]:
    """Part (a)."""
    load = {
        LogicalExpert(layer, e): float(x)
        for layer, row in enumerate(DEEPSEEK_WEIGHTS)
        for e, x in enumerate(row)
    }
    workers = [WorkerSpec(f"gpu{i}", 4) for i in range(8)]
    start = initial_placement(sorted(load), [w.worker_id for w in workers], 4)
    readme: dict[LogicalExpert, tuple[str, ...]] = {}
    for layer, row in enumerate(DEEPSEEK_PHY2LOG):
        for phy, e in enumerate(row):
            key = LogicalExpert(layer, e)
            readme[key] = (*readme.get(key, ()), f"gpu{phy // 2}")
    base = eplb_greedy(load, workers, 16)
    ours = rebalance(load, workers, start, replicas_per_layer=16, tolerance=tolerance)
    ours_free = rebalance(load, workers, start, tolerance=tolerance)

    def row(placement: Placement, moves: int | None) -> dict[str, Any]:
        return {
            "balancedness": round(balancedness(placement, load, workers), 4),
            "per_layer": per_layer_balancedness(placement, load, workers),
            "replicas": sum(len(ws) for ws in placement.values()),
            "moves_from_initial_placement": moves,
        }

    return {
        "setup": "2 layers x 12 experts, 16 replicas per layer, 8 workers x 4 slots; "
        "start: initial_placement, one replica per expert",
        "initial_placement": row(start, 0),
        "eplb_readme_hierarchical": {
            **row(readme, None),
            "note": "EPLB's published answer (groups and nodes constrain it); reference only",
        },
        "eplb_greedy": row(base, count_moves(start, base)),
        "eplb_greedy_relabelled": row(
            relabeled := relabel_workers(base, start, workers), count_moves(start, relabeled)
        ),
        "rebalance": row(ours, count_moves(start, ours)),
        "rebalance_no_replicas_per_layer": row(ours_free, count_moves(start, ours_free)),
        "rebalance_from_eplb_greedy_moves": count_moves(
            base, rebalance(load, workers, base, replicas_per_layer=16, tolerance=tolerance)
        ),
    }


class DriftingLoad:
    """Zipf popularity per layer whose ranks drift, plus fresh noise every window."""

    def __init__(self, args: argparse.Namespace, noise: float, seed: int) -> None:
        self.rng = random.Random(seed)
        self.args = args
        self.noise = noise
        e = args.experts
        self.ranks = [self.rng.sample(range(e), e) for _ in range(args.layers)]
        self.norm = sum((r + 1) ** -args.zipf for r in range(e))

    def drift(self) -> None:
        """Shuffle the ranks of ``drift_experts`` random experts in every layer."""
        for ranks in self.ranks:
            idx = self.rng.sample(range(len(ranks)), self.args.drift_experts)
            vals = [ranks[i] for i in idx]
            self.rng.shuffle(vals)
            for i, v in zip(idx, vals, strict=True):
                ranks[i] = v

    def sample(self) -> dict[LogicalExpert, float]:
        """One window's tokens per logical expert."""
        a = self.args
        return {
            LogicalExpert(layer, e): a.tokens_per_layer
            * (rank + 1) ** -a.zipf
            / self.norm
            * (self.rng.lognormvariate(0.0, self.noise) if self.noise > 0 else 1.0)
            for layer, ranks in enumerate(self.ranks)
            for e, rank in enumerate(ranks)
        }


def check(placement: Placement, load: dict, workers: list[WorkerSpec], rpl: int) -> list[str]:
    """Invariant violations of a placement (empty when fine)."""
    problems = []
    used = Counter(w for ws in placement.values() for w in ws)
    for spec in workers:
        if used[spec.worker_id] > spec.num_slots:
            problems.append(f"{spec.worker_id} over its slots")
    per_layer = Counter()
    for e in load:
        ws = placement.get(e, ())
        per_layer[e.layer] += len(ws)
        if not ws or len(set(ws)) != len(ws):
            problems.append(f"{e}: bad replicas {ws}")
    if per_layer and max(per_layer.values()) > rpl:
        problems.append("a layer over replicas_per_layer")
    return problems


def run_drift(
    args: argparse.Namespace,
    *,
    noise: float,
    slots: int,
    rounds: int,
    progress: Progress,
    label: str,
    keep_rounds: bool,
) -> dict[str, Any]:
    """Part (b) for one setting."""
    loads = DriftingLoad(args, noise, args.seed)
    workers = [WorkerSpec(f"w{i:02d}", slots) for i in range(args.workers)]
    experts = [LogicalExpert(layer, e) for layer in range(args.layers) for e in range(args.experts)]
    start = initial_placement(experts, [w.worker_id for w in workers], slots)
    rpl = args.replicas_per_layer
    problems: list[str] = []

    def step(
        load, ours_prev, raw_prev, base_prev
    ) -> tuple[dict[str, Any], Placement, Placement, Placement]:
        with timer() as t_ours:
            ours = rebalance(
                load, workers, ours_prev, replicas_per_layer=rpl, tolerance=args.tolerance
            )
        with timer() as t_base:
            raw = eplb_greedy(load, workers, rpl)
        base = relabel_workers(raw, base_prev, workers)
        problems.extend(check(ours, load, workers, rpl))
        problems.extend(f"relabelled EPLB: {p}" for p in check(base, load, workers, rpl))
        rec = {
            "balancedness_ours": round(balancedness(ours, load, workers), 4),
            "balancedness_baseline": round(balancedness(base, load, workers), 4),
            "balancedness_eplb_raw": round(balancedness(raw, load, workers), 4),
            "balancedness_if_unchanged": round(balancedness(ours_prev, load, workers), 4),
            "moves_ours": count_moves(ours_prev, ours),
            "moves_baseline": count_moves(base_prev, base),
            "moves_eplb_raw": count_moves(raw_prev, raw),
            "seconds_ours": round(t_ours.elapsed, 3),
            "seconds_baseline": round(t_base.elapsed, 3),
        }
        return rec, ours, raw, base

    task = progress.add_task(label, total=rounds + 1)
    setup, ours, raw, base = step(loads.sample(), start, start, start)
    progress.advance(task)
    recs = []
    for r in range(1, rounds + 1):
        loads.drift()
        rec, ours, raw, base = step(loads.sample(), ours, raw, base)
        recs.append({"round": r, **rec})
        progress.advance(task)
    progress.remove_task(task)

    bal_ours = statistics.fmean(r["balancedness_ours"] for r in recs)
    bal_base = statistics.fmean(r["balancedness_baseline"] for r in recs)
    moves_ours = sum(r["moves_ours"] for r in recs)
    moves_base = sum(r["moves_baseline"] for r in recs)
    moves_raw = sum(r["moves_eplb_raw"] for r in recs)
    ratio = moves_ours / moves_base if moves_base else 0.0
    summary = {
        "rounds": rounds,
        "mean_balancedness_ours": round(bal_ours, 4),
        "mean_balancedness_baseline": round(bal_base, 4),
        "mean_balancedness_eplb_raw": round(
            statistics.fmean(r["balancedness_eplb_raw"] for r in recs), 4
        ),
        "mean_balancedness_if_unchanged": round(
            statistics.fmean(r["balancedness_if_unchanged"] for r in recs), 4
        ),
        "balancedness_gap": round(bal_base - bal_ours, 4),
        "min_round_balancedness_ours": min(r["balancedness_ours"] for r in recs),
        "min_round_balancedness_baseline": min(r["balancedness_baseline"] for r in recs),
        "total_moves_ours": moves_ours,
        "total_moves_baseline": moves_base,
        "total_moves_eplb_raw": moves_raw,
        "moves_ratio_ours_over_baseline": round(ratio, 4),
        "moves_ratio_ours_over_eplb_raw": round(moves_ours / moves_raw, 4) if moves_raw else 0.0,
        "moves_per_round_ours": round(moves_ours / rounds, 1),
        "moves_per_round_baseline": round(moves_base / rounds, 1),
        "moves_per_round_eplb_raw": round(moves_raw / rounds, 1),
        "replicas_total": args.layers * rpl,
        "seconds_per_round_ours": round(statistics.fmean(r["seconds_ours"] for r in recs), 3),
        "seconds_per_round_baseline": round(
            statistics.fmean(r["seconds_baseline"] for r in recs), 3
        ),
        "target_met": bal_ours >= bal_base - BALANCE_MARGIN and ratio <= MOVES_FRACTION,
        "invariants_ok": not problems,
    }
    out: dict[str, Any] = {
        "setting": {"noise_sigma": noise, "slots_per_worker": slots},
        "summary": summary,
        "setup_round": setup,
    }
    if problems:
        out["invariant_violations"] = problems[:20]
    if keep_rounds:
        out["rounds"] = recs
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--layers", type=int, default=24)
    p.add_argument("--experts", type=int, default=64, help="logical experts per layer")
    p.add_argument("--workers", type=int, default=16)
    p.add_argument("--replicas-per-layer", type=int, default=80, help="physical experts")
    p.add_argument(
        "--slots", type=int, default=None, help="slots per worker (default: exactly enough)"
    )
    p.add_argument("--rounds", type=int, default=50)
    p.add_argument("--zipf", type=float, default=1.0, help="Zipf exponent of expert popularity")
    p.add_argument("--drift-experts", type=int, default=4, help="ranks shuffled per layer/round")
    p.add_argument("--noise", type=float, default=0.1, help="sigma of log-normal load noise")
    p.add_argument("--tokens-per-layer", type=float, default=131072.0, help="per window")
    p.add_argument("--tolerance", type=float, default=0.02, help="rebalance tolerance")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-variations", action="store_true", help="skip the extra settings")
    args = p.parse_args()
    slots = args.slots or -(-args.layers * args.replicas_per_layer // args.workers)

    variations = (
        []
        if args.no_variations
        else [
            {"noise": 0.0, "slots": slots},
            {"noise": 0.05, "slots": slots},
            {"noise": 0.2, "slots": slots},
            {"noise": args.noise, "slots": slots + slots // 15},
        ]
    )
    with (
        timer() as total,
        Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            console=console,
            transient=True,
        ) as progress,
    ):
        console.print("[bold]placement[/bold]: (a) DeepSeek EPLB example")
        example = deepseek_example(args.tolerance)
        console.print(
            f"  eplb_greedy {example['eplb_greedy']['balancedness']} "
            f"({example['eplb_greedy']['moves_from_initial_placement']} moves), rebalance "
            f"{example['rebalance']['balancedness']} "
            f"({example['rebalance']['moves_from_initial_placement']} moves), EPLB README "
            f"{example['eplb_readme_hierarchical']['balancedness']}"
        )
        drift = run_drift(
            args,
            noise=args.noise,
            slots=slots,
            rounds=args.rounds,
            progress=progress,
            label=f"(b) drift, noise {args.noise}, {slots} slots",
            keep_rounds=True,
        )
        s = drift["summary"]
        console.print(
            f"  (b) balancedness ours {s['mean_balancedness_ours']} vs baseline "
            f"relabelled EPLB {s['mean_balancedness_baseline']}; moves {s['total_moves_ours']} "
            f"vs {s['total_moves_baseline']} relabelled (ratio "
            f"{s['moves_ratio_ours_over_baseline']}), {s['total_moves_eplb_raw']} raw EPLB "
            f"(ratio {s['moves_ratio_ours_over_eplb_raw']}); target met: {s['target_met']}"
        )
        others = []
        for v in variations:
            res = run_drift(
                args,
                noise=v["noise"],
                slots=v["slots"],
                rounds=args.rounds,
                progress=progress,
                label=f"variation: noise {v['noise']}, {v['slots']} slots",
                keep_rounds=False,
            )
            others.append({**res["setting"], **res["summary"]})
            console.print(
                f"  noise {v['noise']}, {v['slots']} slots: balancedness "
                f"{res['summary']['mean_balancedness_ours']} vs "
                f"{res['summary']['mean_balancedness_baseline']}, moves ratio "
                f"{res['summary']['moves_ratio_ours_over_baseline']} (relabelled EPLB), "
                f"{res['summary']['moves_ratio_ours_over_eplb_raw']} (raw EPLB)"
            )

    emit_json(
        {
            "benchmark": "placement",
            "what": "incremental rebalance vs from-scratch EPLB greedy (DeepSeek EPLB / vLLM), "
            "relabelled per layer (the baseline) and raw",
            "metric": {
                "balancedness": "mean over layers of mean worker load / max worker load "
                "(over all workers); 1.0 = perfect",
                "moves": "replicas in the new placement that the previous one lacked "
                "(weight copies)",
            },
            "config": {
                "layers": args.layers,
                "experts_per_layer": args.experts,
                "workers": args.workers,
                "replicas_per_layer": args.replicas_per_layer,
                "slots_per_worker": slots,
                "slot_note": f"{args.layers} layers x {args.replicas_per_layer} physical "
                f"experts / {args.workers} workers = {slots} slots per worker"
                + (
                    " (every slot used)"
                    if slots * args.workers == args.layers * args.replicas_per_layer
                    else ""
                ),
                "zipf_exponent": args.zipf,
                "drift": f"each round, per layer, the ranks of {args.drift_experts} random "
                "experts are shuffled among themselves (cumulative)",
                "noise": f"every round, each expert's load x lognormal(0, {args.noise}), fresh",
                "tokens_per_layer_per_window": args.tokens_per_layer,
                "rounds": args.rounds,
                "tolerance": args.tolerance,
                "seed": args.seed,
                "baseline": "eplb_greedy from scratch each round, its workers relabelled per "
                "layer by maximum-overlap assignment to its own previous placement (Hungarian); "
                "moves counted against that previous placement. eplb_raw: the same without "
                "relabelling (reported, not the target's baseline)",
            },
            "deepseek_example": example,
            "drift": drift,
            "variations": others,
            "target": {
                "rule": f"mean balancedness >= baseline - {BALANCE_MARGIN} and moves <= "
                f"{MOVES_FRACTION} x baseline moves (drift rounds)",
                "balancedness_ours": s["mean_balancedness_ours"],
                "balancedness_baseline": s["mean_balancedness_baseline"],
                "moves_ours": s["total_moves_ours"],
                "moves_baseline": s["total_moves_baseline"],
                "moves_eplb_raw": s["total_moves_eplb_raw"],
                "moves_ratio": s["moves_ratio_ours_over_baseline"],
                "met": s["target_met"],
            },
            "seconds": round(total.elapsed, 1),
        }
    )


if __name__ == "__main__":
    main()
