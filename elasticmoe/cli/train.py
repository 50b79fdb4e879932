"""``elasticmoe train`` and ``elasticmoe trace record``."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer
import yaml
from rich.console import Console

err = Console(stderr=True)
trace_app = typer.Typer(help="Record expert-routing traces.", no_args_is_help=True)


def _fail(message: str) -> typer.Exit:
    err.print(f"[red]error:[/red] {message}", markup=True, highlight=False)
    return typer.Exit(code=2)


def _parse_sets(items: list[str] | None) -> dict[str, Any]:
    overrides: dict[str, Any] = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise _fail(f"--set {item!r}: expected KEY=VALUE, e.g. train.steps=100")
        overrides[key.strip()] = yaml.safe_load(value)
    return overrides


def train_cmd(
    config: Annotated[Path, typer.Option("--config", "-c", help="training config YAML")],
    set_: Annotated[
        list[str] | None,
        typer.Option("--set", help="override a setting, e.g. --set train.steps=100 (repeatable)"),
    ] = None,
    resume: Annotated[
        bool, typer.Option(help="continue the run's latest checkpoint instead of starting over")
    ] = False,
    ray_address: Annotated[
        str | None, typer.Option(help="Ray cluster to join (default RAY_ADDRESS, else local)")
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="print the summary as JSON")] = False,
) -> None:
    """Train or fine-tune an MoE model on Ray Train and export it in Hugging Face layout."""
    from elasticmoe.model.config import ConfigError
    from elasticmoe.train.config import TrainConfigError, load_train_config
    from elasticmoe.train.trainer import format_event, run_training

    try:
        cfg = load_train_config(config, _parse_sets(set_))
    except TrainConfigError as e:
        raise _fail(str(e)) from None

    def show(event: dict[str, Any]) -> None:
        line = format_event(event)
        if line is not None:
            err.print(line, highlight=False)

    try:
        result = run_training(cfg, resume=resume, on_event=show, ray_address=ray_address)
    except (ValueError, FileNotFoundError, ConfigError) as e:
        raise _fail(str(e)) from None
    summary = {
        "output_dir": str(result.output_dir),
        "steps": result.steps,
        "eval_loss": result.eval_loss,
        "train_tokens": result.data["tokens"],
        "run_dir": str(result.run_dir),
    }
    if as_json:
        print(json.dumps(summary))
        return
    loss = "n/a" if result.eval_loss is None else f"{result.eval_loss:.4f}"
    err.print(
        f"[green]done[/green]: {result.steps} steps, eval loss {loss}; "
        f"exported to {result.output_dir} (serve it: elasticmoe serve --model "
        f"{result.output_dir})",
        highlight=False,
    )


@trace_app.command("record")
def trace_record(
    model: Annotated[str, typer.Option(help="checkpoint directory or built-in name")] = "default",
    out: Annotated[Path, typer.Option(help="CSV to write (timestamp,layer,expert,tokens)")] = Path(
        "trace.csv"
    ),
    corpus: Annotated[
        list[str] | None,
        typer.Option(help="'stdlib' (default) or files/directories/globs (repeatable)"),
    ] = None,
    max_chars: Annotated[int, typer.Option(help="corpus characters to read at most")] = 2_000_000,
    prompts: Annotated[int, typer.Option(help="number of prompts cut from the corpus")] = 256,
    prompt_tokens: Annotated[int, typer.Option(help="tokens per prompt")] = 128,
    max_tokens: Annotated[int, typer.Option(help="tokens generated per prompt")] = 8,
    batch: Annotated[int, typer.Option(help="prompts sent together (a wave)")] = 16,
    dtype: Annotated[str, typer.Option(help="float32 | bfloat16 | auto")] = "float32",
    as_json: Annotated[bool, typer.Option("--json", help="print the summary as JSON")] = False,
) -> None:
    """Run a model over a corpus; save per-step tokens per (layer, expert) for policy simulate."""
    from pydantic import ValidationError

    from elasticmoe.train.config import DataConfig
    from elasticmoe.train.trace import record_trace

    try:
        data = DataConfig(
            corpus="stdlib" if not corpus or corpus == ["stdlib"] else corpus,
            max_chars=max_chars,
        )
    except ValidationError as e:
        raise _fail(f"--corpus/--max-chars: {e.errors()[0]['msg']}") from None
    try:
        with err.status(f"recording {model} over {prompts} prompts") as status:
            summary = record_trace(
                model,
                out,
                data=data,
                prompt_tokens=prompt_tokens,
                max_tokens=max_tokens,
                batch=batch,
                max_prompts=prompts,
                dtype=dtype,
                on_wave=lambda done, total: status.update(f"recording {model}: {done}/{total}"),
            )
    except (ValueError, FileNotFoundError) as e:
        raise _fail(str(e)) from None
    skew = summary.skew()
    result = {
        "out": str(summary.path),
        "rows": summary.rows,
        "steps": summary.steps,
        "duration_s": round(summary.duration_s, 3),
        "moe_layers": list(summary.moe_layers),
        "num_experts": summary.num_experts,
        "skew_max_over_mean": skew,
    }
    if as_json:
        print(json.dumps(result))
        return
    err.print(
        f"[green]wrote[/green] {summary.path}: {summary.rows} rows over {summary.steps} steps "
        f"({summary.duration_s:.1f}s); expert load max/mean: {skew['mean_over_layers']:.2f} "
        f"(mean over layers), {skew['max_layer']:.2f} (worst layer). Replay it with "
        f"elasticmoe policy simulate --trace {summary.path}",
        highlight=False,
    )
