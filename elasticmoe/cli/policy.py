"""``elasticmoe policy``: validate an autoscaling policy, or simulate it on a trace.

Mounted by the main CLI as ``app.add_typer(policy_app, name="policy")``.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table

from elasticmoe.core.policy import Policy, PolicyError, load_policy

policy_app = typer.Typer(
    name="policy",
    help="Validate autoscaling policies and simulate them on load traces.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)
err = Console(stderr=True)
EXIT_INVALID = 2
_PROGRESS_MIN_STEPS = 200  # below this a run takes well under a second


def _fail(message: str) -> typer.Exit:
    err.print(f"[red]error:[/red] {message}", highlight=False)
    return typer.Exit(code=EXIT_INVALID)


def _print_errors(e: PolicyError) -> None:
    err.print(f"[red]invalid policy[/red] {e.source}:", highlight=False)
    for line in e.errors:
        err.print(f"  {line}", highlight=False, markup=False, soft_wrap=True)


def _load(path: Path) -> Policy:
    try:
        return load_policy(path)
    except PolicyError as e:
        _print_errors(e)
        raise typer.Exit(code=EXIT_INVALID) from None


def _s(x: float) -> str:
    return f"{x:g}s"


def _summary_table(policy: Policy) -> Table:
    """One row per rule, for people reading ``validate`` output."""
    spec = policy.spec
    ex, rb, slo = spec.experts, spec.rebalance, spec.slo
    table = Table(show_header=False, box=None, pad_edge=False)
    table.add_column(style="bold")
    table.add_column()
    table.add_row("control loop", f"every {_s(spec.interval_s)}, load window {_s(spec.window_s)}")
    table.add_row(
        "experts",
        f"replicate when load/replica > {ex.hot_threshold:g}x layer mean, "
        f"evict when < {ex.cold_threshold:g}x; replicas {ex.min_replicas}..{ex.max_replicas}; "
        f"cooldowns replicate {_s(ex.replicate_cooldown_s)}, evict {_s(ex.evict_cooldown_s)}; "
        f"<= {ex.max_actions_per_interval} actions/interval",
    )
    table.add_row(
        "rebalance",
        f"when balancedness < {rb.min_balancedness:g}, <= {rb.max_moves_per_interval} "
        f"moves/interval, cooldown {_s(rb.cooldown_s)}"
        if rb.enabled
        else "off",
    )
    for i, p in enumerate(spec.pools):
        cap = (
            f", {p.tokens_per_s_per_worker:g} tokens/s/worker" if p.tokens_per_s_per_worker else ""
        )
        table.add_row(
            "pools" if i == 0 else "",
            f"{p.name} ({p.accelerator}): {p.min_workers}..{p.max_workers} workers x "
            f"{p.slots_per_worker} slots{cap}; up cooldown {_s(p.scale_up_cooldown_s)}, "
            f"down below {p.scale_down_utilization:g} utilisation, cooldown "
            f"{_s(p.scale_down_cooldown_s)}",
        )
    targets = [
        f"{name} <= {v:g} ms"
        for name, v in (("ttft p99", slo.ttft_p99_ms), ("itl p99", slo.itl_p99_ms))
        if v is not None
    ]
    table.add_row(
        "slo",
        f"{', '.join(targets)}; add a worker after {_s(slo.window_s)} in breach"
        if targets
        else "none",
    )
    return table


@policy_app.command()
def validate(
    file: Annotated[Path, typer.Argument(help="policy YAML file")],
    as_json: Annotated[bool, typer.Option("--json", help="print the result as JSON")] = False,
) -> None:
    """Check a policy against the schema; print a summary, or the errors (exit code 2)."""
    try:
        policy = load_policy(file)
    except PolicyError as e:
        if as_json:
            print(json.dumps({"valid": False, "file": str(file), "errors": e.errors}, indent=2))
        else:
            _print_errors(e)
        raise typer.Exit(code=EXIT_INVALID) from None
    if as_json:
        print(
            json.dumps({"valid": True, "file": str(file), "policy": policy.to_document()}, indent=2)
        )
        return
    console = Console()
    console.print(
        f"[green]OK[/green] {file}: {policy.kind} [bold]{policy.metadata.name}[/bold] "
        f"({policy.api_version})",
        highlight=False,
    )
    if policy.metadata.description:
        console.print(f"[dim]{policy.metadata.description.strip()}[/dim]", highlight=False)
    console.print(_summary_table(policy))


def _pct(x: float) -> str:
    return f"{100 * x:.0f}%"


def _print_result(result: Any, baseline: Any | None, max_rows: int) -> None:
    console = Console()
    for note in result.notes:
        console.print(f"[dim]{note}[/dim]", highlight=False)

    actions = Table(title=f"actions ({len(result.actions)})", title_justify="left")
    for col in ("t (s)", "action", "expert", "from", "to", "pool", "reason"):
        actions.add_column(col, justify="right" if col == "t (s)" else "left")
    for ta in result.actions[:max_rows]:
        a = ta.action
        actions.add_row(
            f"{ta.time:g}",
            a.kind,
            str(a.expert) if a.expert is not None else "",
            a.source or "",
            a.target or "",
            f"{a.pool} x{a.count}" if a.pool and a.kind == "add_worker" else (a.pool or ""),
            a.reason,
        )
    if len(result.actions) > max_rows:
        actions.caption = f"... {len(result.actions) - max_rows} more (--max-rows, or --json)"
    console.print(actions)

    timeline = Table(title="per interval (sampled)", title_justify="left")
    for col in ("t (s)", "tokens", "balancedness", "replicas", "workers", "busy", "ttft p99"):
        timeline.add_column(col, justify="right")
    n = len(result.intervals)
    step = max(1, n // 12)
    for s in result.intervals[::step]:
        timeline.add_row(
            f"{s.time:g}",
            f"{s.tokens:,.0f}",
            f"{s.balancedness:.3f}",
            str(s.replicas),
            str(s.workers),
            _pct(s.utilization),
            f"{s.ttft_p99_ms:,.0f} ms",
        )
    console.print(timeline)

    summary = Table(title="summary", title_justify="left")
    summary.add_column("")
    summary.add_column(f"policy {result.policy}", justify="right")
    if baseline is not None:
        summary.add_column("no autoscaling", justify="right")
    a, b = result.summary, baseline.summary if baseline is not None else None
    rows = [
        (
            "actions",
            lambda d: ", ".join(f"{k} {v}" for k, v in d["actions_by_kind"].items()) or "none",
        ),
        ("mean balancedness", lambda d: f"{d['mean_balancedness']:.3f}"),
        ("min balancedness", lambda d: f"{d['min_balancedness']:.3f}"),
        ("final replicas", lambda d: str(d["final_replicas"])),
        ("workers (max / final)", lambda d: f"{d['max_workers']} / {d['final_workers']}"),
        ("worker-seconds", lambda d: f"{d['worker_seconds']:,.0f}"),
        ("mean expert busy", lambda d: _pct(d["mean_utilization"])),
        ("overloaded intervals", lambda d: f"{d['overloaded_intervals']} / {d['intervals']}"),
        ("max ttft p99 (proxy)", lambda d: f"{d['max_ttft_p99_ms']:,.0f} ms"),
    ]
    for label, fmt in rows:
        summary.add_row(label, fmt(a), *([fmt(b)] if b is not None else []))
    console.print(summary)


@policy_app.command()
def simulate(
    policy_file: Annotated[Path, typer.Option("--policy", help="policy YAML file")],
    trace_file: Annotated[
        Path,
        typer.Option(
            "--trace",
            help="CSV: timestamp,layer,expert,tokens (routing trace) or "
            "TIMESTAMP,ContextTokens,GeneratedTokens (request trace; expert load synthesised)",
        ),
    ],
    layers: Annotated[
        int | None, typer.Option(min=1, help="MoE layers (request traces; default 2)")
    ] = None,
    experts: Annotated[
        int | None, typer.Option(min=1, help="experts per layer (request traces; default 8)")
    ] = None,
    workers: Annotated[
        int | None,
        typer.Option(min=1, help="starting workers in the first pool (default: fit min_replicas)"),
    ] = None,
    slots: Annotated[
        int | None, typer.Option(min=1, help="slots of the starting workers (default: the pool's)")
    ] = None,
    duration: Annotated[
        float | None, typer.Option(min=0, help="simulate only the first S seconds (after scaling)")
    ] = None,
    time_scale: Annotated[float, typer.Option(help="replay the trace X times faster (> 0)")] = 1.0,
    top_k: Annotated[int, typer.Option(min=1, help="experts per token (request traces)")] = 2,
    zipf_s: Annotated[float, typer.Option(help="Zipf exponent of expert popularity")] = 1.0,
    drift_s: Annotated[float, typer.Option(help="popularity drifts every S seconds (> 0)")] = 300.0,
    seed: Annotated[int, typer.Option(help="seed of the synthesised popularity")] = 0,
    capacity: Annotated[
        float | None,
        typer.Option(help="token-rows/s per worker (default: calibrated to the trace)"),
    ] = None,
    baseline: Annotated[
        bool, typer.Option(help="also replay without autoscaling, for comparison")
    ] = True,
    max_rows: Annotated[int, typer.Option(min=0, help="actions shown in the table")] = 40,
    as_json: Annotated[bool, typer.Option("--json", help="print the full result as JSON")] = False,
) -> None:
    """Replay a load trace through a policy, without a cluster: actions and balance over time."""
    from elasticmoe.autoscale.simulate import load_trace
    from elasticmoe.autoscale.simulate import simulate as run_simulation

    policy = _load(policy_file)
    for name, value in (
        ("--time-scale", time_scale),
        ("--drift-s", drift_s),
        ("--capacity", capacity),
    ):
        if value is not None and not value > 0:
            raise _fail(f"{name} must be > 0, got {value:g}")
    try:
        trace = load_trace(
            trace_file,
            layers=layers,
            experts=experts,
            time_scale=time_scale,
            top_k=top_k,
            zipf_s=zipf_s,
            drift_s=drift_s,
            seed=seed,
        )
    except (OSError, ValueError) as e:
        raise _fail(f"trace {trace_file}: {e}") from None
    span = trace.duration_s if duration is None else min(duration, trace.duration_s)
    steps = max(1, math.ceil(span / policy.spec.interval_s))
    runs = 2 if baseline else 1

    progress = Progress(
        TextColumn("[progress.description]{task.description}"),
        BarColumn(),
        TextColumn("{task.completed}/{task.total} intervals"),
        TimeRemainingColumn(),
        console=err,
        transient=True,
        disable=steps * runs < _PROGRESS_MIN_STEPS or not err.is_terminal,
    )
    kwargs: dict[str, Any] = {
        "workers": workers,
        "slots": slots,
        "duration_s": duration,
        "capacity_tokens_per_s": capacity,
    }
    try:
        with progress:
            task = progress.add_task(f"simulating {policy.metadata.name}", total=steps * runs)

            def tick(done: int, total: int, offset: int = 0) -> None:
                progress.update(task, completed=offset + done, total=total * runs)

            result = run_simulation(policy, trace, progress=tick, **kwargs)
            base = None
            if baseline:
                progress.update(task, description="simulating without autoscaling")
                base = run_simulation(
                    policy,
                    trace,
                    autoscale=False,
                    progress=lambda d, t: tick(d, t, len(result.intervals)),
                    **kwargs,
                )
    except ValueError as e:
        raise _fail(str(e)) from None

    if as_json:
        out = result.to_dict()
        if base is not None:
            out["baseline"] = {"notes": base.notes, "summary": base.summary}
        print(json.dumps(out, indent=2))
        return
    _print_result(result, base, max_rows)
