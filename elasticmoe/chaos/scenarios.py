"""Chaos scenarios: a fault (or a series of faults) under steady load, and its report.

:func:`run_scenario` runs one scenario against a running deployment:

1. every prompt of the load's pool runs once, fault-free: the reference outputs;
2. steady streaming load starts (:class:`~elasticmoe.chaos.load.LoadGenerator`);
   ``before_s`` seconds of it are the baseline;
3. the scenario injects its faults over ``duration_s`` and, after each, times
   how long until the deployment is whole again (every expert back to its
   minimum replica count on live workers, as many live workers as before,
   every engine and the controller answering); ``None`` (counted as
   ``unrestored``) when the next fault came first;
4. the load stops; requests still in flight are waited for.

The report (a dict, printed as JSON by ``elasticmoe chaos`` and
``bench/chaos.py``) counts requests sent, completed and failed (with their
errors), greedy outputs that differ from the reference, the restore times,
and p99 inter-token latency and throughput during the faults vs before.
"""

from __future__ import annotations

import collections
import contextlib
import threading
import time
from collections.abc import Callable
from typing import Any

from elasticmoe.chaos.faults import FaultInjector
from elasticmoe.chaos.load import LoadGenerator, RequestRecord, make_prompts
from elasticmoe.core.stats import percentile
from elasticmoe.engine.request import SamplingParams

__all__ = ["SCENARIOS", "run_scenario"]

SCENARIOS: dict[str, str] = {
    "worker-kill": "kill a random expert worker every --interval seconds",
    "node-loss": "lose the node (other than the driver's) that holds the most workers",
    "controller-kill": "kill the controller half-way through a migration",
    "redis-outage": "take the state store's Redis away for the duration, then bring it back",
    "engine-kill": "kill an engine while it streams",
    "slow-worker": "delay one worker's expert calls by --delay-ms for the duration",
}


def _p99(values: list[float]) -> float | None:
    return percentile(values, 99)


def _window(records: list[RequestRecord], start: float, end: float) -> tuple[list[float], int]:
    """Inter-token gaps and tokens that arrived in [start, end)."""
    gaps, tokens = [], 0
    for r in records:
        times = r.token_times
        for i, t in enumerate(times):
            if start <= t < end:
                tokens += 1
                if i:
                    gaps.append(t - times[i - 1])
    return gaps, tokens


def _ratio(during: float | None, before: float | None) -> float | None:
    if during is None or not before:
        return None
    return round(during / before, 3)


class _Run:
    """One scenario's faults, with their times and restore times."""

    def __init__(self, injector: FaultInjector, baseline_workers: int, t0: float) -> None:
        self.injector = injector
        self.baseline = baseline_workers
        self.t0 = t0
        self.faults: list[dict[str, Any]] = []
        self.notes: dict[str, Any] = {}

    def fault(self, kind: str, target: Any = None) -> dict[str, Any]:
        entry = {"t_s": round(time.monotonic() - self.t0, 2), "kind": kind, "target": target}
        self.faults.append(entry)
        return entry

    def restored(
        self,
        entry: dict[str, Any],
        timeout: float,
        gone: frozenset[str] = frozenset(),
        restarted: dict[str, str] | None = None,
    ) -> None:
        """Record how long after ``entry``'s fault the deployment was whole again."""
        waited = self.injector.wait_healthy(self.baseline, timeout, gone, restarted)
        whole = waited is not None
        since_fault = time.monotonic() - self.t0 - entry["t_s"]
        entry["restored_s"] = round(since_fault, 2) if whole else None


def _worker_kill(run: _Run, duration_s: float, interval_s: float, **_: Any) -> None:
    end = time.monotonic() + duration_s
    while time.monotonic() < end:
        next_kill = time.monotonic() + interval_s
        dead = run.injector.kill_worker()
        entry = run.fault("kill_worker", dead)
        # restored before the next kill, or (after the last one) within two minutes
        last = next_kill >= end
        timeout = 120.0 if last else max(1.0, next_kill - time.monotonic())
        run.restored(entry, timeout, gone=frozenset({dead}))
        time.sleep(max(0.0, min(next_kill, end) - time.monotonic()))


def _node_loss(run: _Run, duration_s: float, **_: Any) -> None:
    end = time.monotonic() + duration_s
    inj = run.injector
    node = inj.pick_node()
    on_node = frozenset(w["worker_id"] for w in inj.workers() if w.get("node_id") == node)
    old = inj.instances()
    # the controller and engines on that node die with it; wait for their restart
    restarted = {k: v for k, v in old.items() if k in inj.actors_on(node)}
    entry = run.fault("lose_node", {"node_id": node, "workers": sorted(on_node)})
    inj.lose_node(node)
    run.restored(entry, max(120.0, duration_s), gone=on_node, restarted=restarted)
    time.sleep(max(0.0, end - time.monotonic()))


def _engine_kill(run: _Run, duration_s: float, **_: Any) -> None:
    end = time.monotonic() + duration_s
    old = run.injector.instances()
    name = run.injector.kill_engine(0)
    entry = run.fault("kill_engine", name)
    run.restored(entry, max(120.0, duration_s), restarted={name: old[name]})
    time.sleep(max(0.0, end - time.monotonic()))


def _slow_worker(run: _Run, duration_s: float, delay_ms: float, **_: Any) -> None:
    """A slow worker loses no redundancy; what counts is how soon every engine avoids it."""
    import ray

    inj = run.injector
    end = time.monotonic() + duration_s
    slow = inj.slow_worker(delay_ms=delay_ms)
    entry = run.fault("slow_worker", slow)
    entry["delay_ms"] = delay_ms
    entry["avoided_after_s"] = None
    while time.monotonic() < end:
        stats = ray.get([e.stats.remote() for e in inj.engines()], timeout=30)
        if all(slow in s.get("slow_workers", ()) for s in stats):
            entry["avoided_after_s"] = round(time.monotonic() - run.t0 - entry["t_s"], 2)
            break
        time.sleep(0.1)
    time.sleep(max(0.0, end - time.monotonic()))
    inj.clear_faults()


def _reason(e: BaseException) -> str:
    """The controller's own error message, without Ray's remote traceback around it."""
    cause = getattr(e, "cause", None)  # ray.exceptions.RayTaskError
    inner = cause if isinstance(cause, BaseException) else e
    return f"{type(inner).__name__}: {inner}"


def _pick_migration(injector: FaultInjector) -> tuple[str, str, str]:
    """An expert, a worker holding it and a worker with a free slot that does not."""
    status = injector.call("status")
    spares = set(status["spare_workers"])  # started, but outside the map
    slots = {
        w["worker_id"]: w["num_slots"] - w["num_replicas"]
        for w in status["workers"]
        if w["worker_id"] not in spares and w["healthy"]
    }
    for expert, holders in status["replicas"].items():
        for target, free in sorted(slots.items(), key=lambda kv: -kv[1]):
            if free > 0 and target not in holders:
                return expert, holders[0], target
    raise RuntimeError("no migration possible: every worker with a free slot holds each expert")


def _controller_kill(run: _Run, duration_s: float, **_: Any) -> None:
    import ray

    inj = run.injector
    end = time.monotonic() + duration_s
    expert, source, target = _pick_migration(inj)
    # the target loads slowly, so the controller is surely killed half-way
    inj.slow_worker(target, delay_ms=0.0, load_delay_ms=2000.0)
    outcome: dict[str, Any] = {}

    def migrate() -> None:
        try:
            outcome["result"] = inj.call("migrate", expert, source, target)
        except ray.exceptions.RayActorError as e:
            outcome["error"] = f"controller died during the migration ({type(e).__name__})"
        except Exception as e:
            outcome["error"] = _reason(e)

    thread = threading.Thread(target=migrate)
    thread.start()
    time.sleep(0.5)
    old = inj.instances()
    entry = run.fault("kill_controller", {"migrating": expert, "from": source, "to": target})
    inj.kill_controller()
    thread.join(60)
    run.restored(entry, max(120.0, duration_s), restarted={"controller": old["controller"]})
    inj.clear_faults()
    with contextlib.suppress(Exception):
        history = inj.call("status")["history"]
        recovered = [h for h in history if h.get("recovered")]
        run.notes["recovered_operations"] = recovered
    run.notes["migration"] = outcome
    time.sleep(max(0.0, end - time.monotonic()))


def _redis_outage(run: _Run, duration_s: float, **_: Any) -> None:
    inj = run.injector
    expert, _, target = _pick_migration(inj)
    entry = run.fault("stop_redis")
    inj.stop_redis()
    try:
        time.sleep(min(2.0, duration_s / 2))
        try:
            inj.call("replicate", expert, target)
            run.notes["change_during_outage"] = "applied (unexpected)"
        except Exception as e:
            run.notes["change_during_outage"] = f"refused: {_reason(e)}"
        time.sleep(max(0.0, duration_s - min(2.0, duration_s / 2)))
    finally:
        inj.start_redis()
    back = run.fault("start_redis")
    run.restored(back, 120.0)
    entry["restored_s"] = back["restored_s"]
    try:  # changes work again once Redis is back
        inj.call("replicate", expert, target)
        inj.call("evict", expert, target)
        run.notes["change_after_outage"] = "applied"
    except Exception as e:
        run.notes["change_after_outage"] = f"failed: {_reason(e)}"


_RUNNERS: dict[str, Callable[..., None]] = {
    "worker-kill": _worker_kill,
    "node-loss": _node_loss,
    "controller-kill": _controller_kill,
    "redis-outage": _redis_outage,
    "engine-kill": _engine_kill,
    "slow-worker": _slow_worker,
}


def run_scenario(
    injector: FaultInjector,
    scenario: str,
    duration_s: float = 30.0,
    *,
    before_s: float = 8.0,
    interval_s: float = 10.0,
    delay_ms: float = 200.0,
    concurrency: int = 4,
    num_prompts: int = 8,
    max_tokens: int = 24,
    vocab_size: int | None = None,
    seed: int = 0,
    log: Callable[[str], None] = lambda _: None,
) -> dict[str, Any]:
    """Run ``scenario`` under load against ``injector``'s deployment; returns the report."""
    if scenario not in _RUNNERS:
        raise ValueError(f"unknown scenario {scenario!r}; one of: {', '.join(SCENARIOS)}")
    import ray

    if vocab_size is None:
        vocab_size = ray.get(injector.engines()[0].ready.remote(), timeout=60)["vocab_size"]
    params = SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True)
    prompts = make_prompts(num_prompts, vocab_size, seed)
    load = LoadGenerator(injector.engines, prompts, params, concurrency)
    baseline_workers = len(injector.workers())
    log(f"reference run of {num_prompts} prompts")
    reference = {}
    for i in range(num_prompts):
        rec = load.run_once(i)
        if not rec.ok:
            raise RuntimeError(f"the deployment fails before any fault: {rec.error}")
        reference[i] = rec.token_ids
    log(f"steady load: {concurrency} streaming clients, {before_s:.0f} s baseline")
    t_start = time.monotonic()
    load.start()
    time.sleep(before_s)
    t_fault = time.monotonic()
    run = _Run(injector, baseline_workers, t_fault)
    log(f"scenario {scenario}: {SCENARIOS[scenario]}")
    try:
        _RUNNERS[scenario](run, duration_s=duration_s, interval_s=interval_s, delay_ms=delay_ms)
        final = injector.wait_healthy(baseline_workers, 180.0)
    finally:
        t_end = time.monotonic()
        log("stopping the load; waiting for requests in flight")
        lost = load.stop()
    records = list(load.records)
    ok = [r for r in records if r.ok]
    failed = [r for r in records if not r.ok]
    differing = sum(r.token_ids != reference[r.prompt_index] for r in ok)
    # the baseline skips the first second (clients still ramping up)
    gaps_before, tokens_before = _window(records, t_start + 1.0, t_fault)
    gaps_during, tokens_during = _window(records, t_fault, t_end)
    itl_before, itl_during = _p99(gaps_before), _p99(gaps_during)
    tput_before = tokens_before / max(1e-9, t_fault - t_start - 1.0)
    tput_during = tokens_during / max(1e-9, t_end - t_fault)
    restore = [f["restored_s"] for f in run.faults if "restored_s" in f]
    return {
        "scenario": scenario,
        "description": SCENARIOS[scenario],
        "duration_s": round(t_end - t_fault, 2),
        "requests": {
            "sent": len(records) + lost,
            "completed": len(ok),
            "failed": len(failed),
            "lost": lost,
            "rerun_on_another_engine": sum(r.attempts > 1 for r in records),
        },
        "errors": dict(collections.Counter(r.error for r in failed)),
        "differing_outputs": differing,
        "faults": run.faults,
        "time_to_full_redundancy_s": {
            "per_fault": restore,
            "max": max((r for r in restore if r is not None), default=None),
            "unrestored": sum(r is None for r in restore),
        },
        "whole_at_end": final is not None,
        "itl_p99_ms": {
            "before": round(itl_before * 1e3, 1) if itl_before else None,
            "during": round(itl_during * 1e3, 1) if itl_during else None,
            "ratio": _ratio(itl_during, itl_before),
        },
        "throughput_tok_s": {
            "before": round(tput_before, 1),
            "during": round(tput_during, 1),
            "ratio": _ratio(tput_during, tput_before),
        },
        **({"notes": run.notes} if run.notes else {}),
    }
