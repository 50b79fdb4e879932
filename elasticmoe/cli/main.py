"""The ``elasticmoe`` command line."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from elasticmoe.cli.policy import policy_app
from elasticmoe.cli.train import trace_app, train_cmd

app = typer.Typer(
    name="elasticmoe",
    help="Serve Mixture-of-Experts LLMs with expert-level elasticity.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)
err = Console(stderr=True)
app.add_typer(policy_app, name="policy")
app.add_typer(trace_app, name="trace")
app.command("train")(train_cmd)


def _fail(message: str) -> typer.Exit:
    err.print(f"[red]error:[/red] {message}")
    return typer.Exit(code=2)


@app.command("init-model")
def init_model_cmd(
    out_dir: Annotated[Path, typer.Argument(help="directory to write the checkpoint to")],
    arch: Annotated[
        str,
        typer.Option(
            help="mixtral | qwen2_moe | qwen3_moe | olmoe | deepseek_v3 | glm4_moe | gpt_oss"
        ),
    ] = "mixtral",
    preset: Annotated[str, typer.Option(help="tiny | small")] = "tiny",
    seed: Annotated[int, typer.Option(help="random seed of the weights")] = 0,
    dtype: Annotated[str, typer.Option(help="float32 | bfloat16")] = "float32",
    max_shard_size_mb: Annotated[
        float | None, typer.Option(help="split weights into shards of this size (with an index)")
    ] = None,
    overwrite: Annotated[bool, typer.Option(help="replace an existing checkpoint")] = False,
) -> None:
    """Write a random-weight MoE checkpoint (Hugging Face layout, with a tokenizer)."""
    from elasticmoe.model.init_model import init_model

    try:
        with err.status(f"writing {arch}/{preset} checkpoint to {out_dir}"):
            path = init_model(
                arch,
                preset,
                out_dir,
                seed=seed,
                dtype=dtype,
                max_shard_size_mb=max_shard_size_mb,
                overwrite=overwrite,
            )
    except (ValueError, FileExistsError) as e:
        raise _fail(str(e)) from None
    err.print(f"[green]wrote[/green] {arch} ({preset}) checkpoint to {path}")


@app.command()
def generate(
    model: Annotated[str, typer.Option(help="checkpoint directory or built-in name")] = "default",
    prompt: Annotated[list[str] | None, typer.Option(help="prompt text (repeatable)")] = None,
    token_ids: Annotated[
        str | None, typer.Option(help="prompt as comma-separated token ids, e.g. 1,2,3")
    ] = None,
    max_tokens: Annotated[int, typer.Option(help="tokens to generate")] = 32,
    temperature: Annotated[float, typer.Option(help="0 = greedy")] = 0.0,
    top_p: Annotated[float, typer.Option()] = 1.0,
    top_k: Annotated[int, typer.Option(help="0 = off")] = 0,
    seed: Annotated[int | None, typer.Option()] = None,
    stop: Annotated[list[str] | None, typer.Option(help="stop string (repeatable)")] = None,
    dtype: Annotated[str, typer.Option(help="auto | float32 | bfloat16")] = "auto",
    device: Annotated[str, typer.Option(help="auto | cpu | cuda")] = "auto",
    as_json: Annotated[bool, typer.Option("--json", help="print results as JSON")] = False,
) -> None:
    """Generate completions locally (all experts in this process)."""
    from elasticmoe import LLM, SamplingParams

    prompts: list = list(prompt or [])
    if token_ids:
        try:
            prompts.append(
                {"prompt_token_ids": [int(t) for t in token_ids.split(",") if t.strip()]}
            )
        except ValueError:
            raise _fail(f"--token-ids {token_ids!r}: expected integers like 1,2,3") from None
    if not prompts:
        raise _fail("give --prompt TEXT or --token-ids 1,2,3")
    try:
        params = SamplingParams(
            max_tokens=max_tokens,
            temperature=temperature,
            top_p=top_p,
            top_k=top_k,
            seed=seed,
            stop=stop or [],
        )
        with err.status(f"loading {model}"):
            start = time.perf_counter()
            llm = LLM(model=model, dtype=dtype, device=device)
            load_s = time.perf_counter() - start
        start = time.perf_counter()
        outputs = llm.generate(prompts, params, use_tqdm=not as_json)
        gen_s = time.perf_counter() - start
    except (ValueError, FileNotFoundError) as e:
        raise _fail(str(e)) from None
    if as_json:
        print(
            json.dumps(
                [
                    {
                        "prompt": o.prompt,
                        "prompt_token_ids": o.prompt_token_ids,
                        "text": o.outputs[0].text,
                        "token_ids": o.outputs[0].token_ids,
                        "finish_reason": o.outputs[0].finish_reason,
                    }
                    for o in outputs
                ]
            )
        )
        return
    console = Console()
    num_tokens = 0
    for o in outputs:
        shown = o.prompt if o.prompt is not None else o.prompt_token_ids
        console.print(f"[bold]prompt:[/bold] {shown!r}")
        console.print(f"[bold]output:[/bold] {o.outputs[0].text!r}")
        console.print(f"[dim]token ids: {o.outputs[0].token_ids}[/dim]")
        num_tokens += len(o.outputs[0].token_ids)
    err.print(
        f"[green]done[/green]: {len(outputs)} prompt(s), {num_tokens} tokens in {gen_s:.2f}s "
        f"({num_tokens / max(gen_s, 1e-9):.1f} tok/s; model load {load_s:.2f}s)"
    )


@app.command("serve")
def serve_cmd(
    config: Annotated[
        Path | None, typer.Option("--config", "-c", help="YAML file of ServeConfig settings")
    ] = None,
    model: Annotated[str | None, typer.Option(help="checkpoint dir or built-in name")] = None,
    mode: Annotated[str | None, typer.Option(help="distributed | local")] = None,
    workers: Annotated[int | None, typer.Option(help="expert workers")] = None,
    engines: Annotated[int | None, typer.Option(help="engine replicas")] = None,
    policy: Annotated[str | None, typer.Option(help="autoscaling policy YAML")] = None,
    state_store: Annotated[
        str | None, typer.Option(help="memory:// or redis://host:port/db")
    ] = None,
    host: Annotated[str | None, typer.Option()] = None,
    port: Annotated[int | None, typer.Option()] = None,
    api_keys_file: Annotated[
        Path | None,
        typer.Option(help="file of Bearer keys for /v1, one a line (or ELASTICMOE_API_KEYS)"),
    ] = None,
    admin_keys_file: Annotated[
        Path | None,
        typer.Option(
            help="file of Bearer keys for /admin, one a line (or ELASTICMOE_ADMIN_API_KEYS)"
        ),
    ] = None,
    name: Annotated[str | None, typer.Option(help="deployment name")] = None,
    stream_interval: Annotated[
        int | None, typer.Option(help="stream a completion's tokens once this many are new")
    ] = None,
    ingress: Annotated[
        str | None,
        typer.Option(help="auto | direct (the front listens itself) | proxy (Ray Serve's proxy)"),
    ] = None,
) -> None:
    """Serve a model over an OpenAI-compatible HTTP API (Ctrl-C stops it cleanly)."""
    from pydantic import ValidationError

    from elasticmoe.serve.server import check_port_free, load_serve_config, run_server

    overrides = {
        "model": model,
        "mode": mode,
        "num_workers": workers,
        "num_engines": engines,
        "policy": policy,
        "state_store": state_store,
        "host": host,
        "port": port,
        "name": name,
        "stream_interval": stream_interval,
        "ingress": ingress,
    }
    # Keys never on the command line (Ray shows a driver's argv on its dashboard):
    # a file, or the environment, which load_serve_config reads.
    environ = dict(os.environ)
    for path, env in ((api_keys_file, "ELASTICMOE_API_KEYS"),
                      (admin_keys_file, "ELASTICMOE_ADMIN_API_KEYS")):  # fmt: skip
        if path is not None:
            environ[f"{env}_FILE"] = str(path)
            environ.pop(env, None)
    try:
        cfg = load_serve_config(config, overrides, environ)
        check_port_free(cfg, environ)  # here, where its error is reported like the rest
    except (ValidationError, ValueError) as e:
        raise _fail(str(e)) from None
    run_server(cfg)


def _controller(deployment: str, ray_address: str | None):
    from elasticmoe.control.client import ControllerClient, ControllerNotFoundError

    try:
        return ControllerClient(deployment, ray_address)
    except ControllerNotFoundError as e:
        raise _fail(str(e)) from None


DeploymentOpt = Annotated[str, typer.Option("--deployment", "-d", help="deployment name")]
RayAddressOpt = Annotated[
    str | None, typer.Option(help="Ray cluster address (default: RAY_ADDRESS, else local)")
]


@app.command()
def status(
    deployment: DeploymentOpt = "default",
    ray_address: RayAddressOpt = None,
    as_json: Annotated[bool, typer.Option("--json", help="print the status as JSON")] = False,
) -> None:
    """Show workers, replicas, per-expert load and the expert map epoch of a running deployment."""
    data = _controller(deployment, ray_address).call("status")
    if as_json:
        print(json.dumps(data))
        return
    print_status(data)


def print_status(data: dict) -> None:
    """Render a controller status document as rich tables."""
    from rich.table import Table

    console = Console()
    console.print(f"[bold]expert map epoch[/bold] {data['epoch']}  engines: {data['num_engines']}")
    workers = Table(
        "worker", "address", "pool", "replicas / slots", "load", "healthy", title="workers"
    )
    for w in data["workers"]:
        workers.add_row(
            w["worker_id"],
            w["address"] or "-",
            w["pool"] or "-",
            f"{w['num_replicas']} / {w['num_slots']}",
            f"{w['load']:.0f}",
            "yes" if w["healthy"] else "[red]no[/red]",
        )
    console.print(workers)
    experts = Table("expert", "replicas", "workers", "tokens routed", title="experts")
    load = data["expert_load"]
    for expert, holders in data["replicas"].items():
        experts.add_row(expert, str(len(holders)), ",".join(holders), f"{load.get(expert, 0):.0f}")
    console.print(experts)


@app.command()
def scale(
    expert: Annotated[str, typer.Option(help="logical expert as LAYER:EXPERT, e.g. 0:3")],
    replicas: Annotated[int, typer.Option(help="wanted number of replicas")],
    deployment: DeploymentOpt = "default",
    ray_address: RayAddressOpt = None,
    as_json: Annotated[bool, typer.Option("--json", help="print the operations as JSON")] = False,
) -> None:
    """Set the replica count of one logical expert (zero-downtime replicate/evict)."""
    from elasticmoe.control.controller import ControllerError

    client = _controller(deployment, ray_address)
    try:
        with err.status(f"scaling expert {expert} to {replicas} replica(s)"):
            results = client.call("scale", expert, replicas)
    except ControllerError as e:
        raise _fail(str(e)) from None
    if as_json:
        print(json.dumps(results))
        return
    for r in results:
        err.print(
            f"[green]{r['kind']}[/green] epoch {r['epoch']} in {r['seconds']}s: "
            f"+{r['add']} -{r['remove']}"
        )
    err.print(f"expert {expert} now has {replicas} replica(s)")


@app.command()
def chaos(
    scenario: Annotated[
        str,
        typer.Option(
            help="worker-kill | node-loss | controller-kill | redis-outage | engine-kill | "
            "slow-worker"
        ),
    ],
    duration: Annotated[float, typer.Option(help="seconds of faults", min=1)] = 60.0,
    deployment: DeploymentOpt = "default",
    ray_address: RayAddressOpt = None,
    interval: Annotated[
        float, typer.Option(help="worker-kill: seconds between kills", min=1)
    ] = 10.0,
    delay_ms: Annotated[
        float, typer.Option(help="slow-worker: added delay per call", min=0)
    ] = 200.0,
    concurrency: Annotated[int, typer.Option(help="streaming clients of the load", min=1)] = 4,
    baseline: Annotated[float, typer.Option(help="seconds of fault-free load first", min=1)] = 10.0,
    seed: int = 0,
) -> None:
    """Run a fault scenario against a running deployment under load; print a JSON report.

    The load streams greedy requests straight to the engines; the report counts
    requests sent, completed and failed, outputs that differ from a fault-free
    run, the time until every expert is back to its minimum replica count, and
    p99 inter-token latency during the faults vs before. slow-worker needs
    ``fault_injection: true`` in the deployment; redis-outage pauses the
    deployment's Redis (CLIENT PAUSE). Exits 1 if a request failed, was lost
    or differs.
    """
    from elasticmoe.chaos import SCENARIOS, FaultInjector, run_scenario

    if scenario not in SCENARIOS:
        raise _fail(f"--scenario {scenario!r}: one of {', '.join(SCENARIOS)}")
    _controller(deployment, ray_address)  # connects to Ray; fails clearly if nothing runs
    injector = FaultInjector(deployment, seed=seed)
    try:
        with err.status(f"chaos: {scenario}") as status:
            report = run_scenario(
                injector,
                scenario,
                duration,
                before_s=baseline,
                interval_s=interval,
                delay_ms=delay_ms,
                concurrency=concurrency,
                seed=seed,
                log=lambda msg: status.update(f"chaos: {msg}"),
            )
    except (RuntimeError, ValueError) as e:
        raise _fail(str(e)) from None
    print(json.dumps(report, indent=2))
    r = report["requests"]
    bad = r["failed"] + r["lost"] + report["differing_outputs"]
    err.print(
        f"{scenario}: {r['completed']}/{r['sent']} completed, {r['failed']} failed, "
        f"{r['lost']} lost, {report['differing_outputs']} differing; "
        f"redundancy restored in {report['time_to_full_redundancy_s']['max']} s; "
        f"p99 ITL x{report['itl_p99_ms']['ratio']}"
    )
    if bad:
        raise typer.Exit(1)


def main() -> None:
    """Entry point for ``python -m elasticmoe``."""
    app()


if __name__ == "__main__":
    main()
