"""Build and run the Ray Train ``TorchTrainer`` for a :class:`TrainConfig`, then export.

:func:`run_training` is what ``elasticmoe train`` calls: prepare the data and the model
config once on the driver, run the data-parallel workers (restarting the worker group from
the latest checkpoint when a worker dies, up to ``max_failures`` times), print progress as it
comes, and export the final weights in Hugging Face layout.
"""

from __future__ import annotations

import json
import os
import shutil
import threading
import time
import typing
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from elasticmoe.control.cluster import start_local_ray
from elasticmoe.model.config import ConfigError, load_config, parse_config
from elasticmoe.model.init_model import build_config
from elasticmoe.model.registry import resolve_model
from elasticmoe.train.config import ModelSpec, TrainConfig
from elasticmoe.train.data import PreparedData, prepare_data
from elasticmoe.train.export import export_checkpoint
from elasticmoe.train.loop import STATE_FILE, train_loop_per_worker

__all__ = ["TrainResult", "format_event", "model_config_for", "run_training"]

ProgressCallback = Callable[[dict[str, Any]], None]


@dataclass
class TrainResult:
    """What a finished run produced."""

    output_dir: Path
    run_dir: Path
    steps: int
    eval_loss: float | None
    data: dict[str, Any]
    events: list[dict[str, Any]] = field(default_factory=list)


def model_config_for(cfg: TrainConfig, vocab_size: int) -> dict[str, Any]:
    """The HF config.json dict of the model to train (from scratch or ``init_from``)."""
    if cfg.model.init_from is not None:
        path = resolve_model(cfg.model.init_from)
        load_config(path)  # validates the family and fields; raises naming the file
        config = json.loads((path / "config.json").read_text())
    else:
        config = build_config(
            cfg.model.arch, cfg.model.preset, vocab_size=vocab_size, **cfg.model.overrides
        )
    if cfg.model.router_aux_loss_coef is not None:
        config["router_aux_loss_coef"] = cfg.model.router_aux_loss_coef
    config.setdefault("router_aux_loss_coef", 0.001)
    # fail here, on the driver, when overrides make an unsupported model
    mc = parse_config(config, "model (config.json after model.overrides)")
    trainable = typing.get_args(ModelSpec.model_fields["arch"].annotation)
    if mc.model_type not in trainable:  # served, but TrainableMoE lacks its routing/attention
        raise ConfigError(
            f"model.init_from: model_type={mc.model_type!r} cannot be trained; "
            f"elasticmoe train supports {', '.join(trainable)}"
        )
    return config


def format_event(e: dict[str, Any]) -> str | None:
    """One rich-markup progress line for a progress event (None: nothing to print)."""
    kind = e.get("event")
    if kind == "start":
        how = "resumed at" if e.get("resumed") else "starting at"
        return (
            f"[bold]train[/bold] {how} step {e['step']}/{e['steps']} on {e['world_size']} "
            f"worker(s) ({e['device']}), {e['params'] / 1e6:.2f}M parameters"
        )
    if kind == "train":
        return (
            f"step {e['step']:>6}  loss {e['loss']:.4f}  lm {e['lm_loss']:.4f}  "
            f"aux {e['aux_loss']:.3f}  lr {e['lr']:.2e}  |g| {e['grad_norm']:.2f}  "
            f"skew {e['expert_skew']:.2f}  {e['tokens_per_s']:.0f} tok/s"
        )
    if kind == "eval":
        return (
            f"[cyan]eval[/cyan]  step {e['step']:>6}  loss {e['eval_loss']:.4f}  "
            f"ppl {e['perplexity']:.1f}"
        )
    if kind == "checkpoint":
        return f"[dim]checkpoint at step {e['step']}[/dim]"
    if kind == "fault":
        return f"[red]fault injected: worker {e['rank']} exits at step {e['step']}[/red]"
    return None


class _Tail(threading.Thread):
    """Follow a JSON-lines file and hand each new event to a callback."""

    def __init__(
        self, path: Path, callback: ProgressCallback | None, start_offset: int = 0
    ) -> None:
        super().__init__(daemon=True)
        self.path = path
        self.callback = callback
        self.events: list[dict[str, Any]] = []
        self._done = threading.Event()
        self._offset = start_offset

    def poll(self) -> None:
        if not self.path.is_file():
            return
        with open(self.path) as f:
            f.seek(self._offset)
            while line := f.readline():
                if not line.endswith("\n"):
                    break  # partially written; read it next time
                self._offset += len(line.encode())
                event = json.loads(line)
                self.events.append(event)
                if self.callback is not None:
                    self.callback(event)

    def run(self) -> None:
        while not self._done.wait(0.5):
            self.poll()

    def stop(self) -> None:
        self._done.set()
        self.join()
        self.poll()


def _use_gpu(cfg: TrainConfig) -> bool:
    if cfg.scaling.use_gpu != "auto":
        return bool(cfg.scaling.use_gpu)
    import ray

    return ray.cluster_resources().get("GPU", 0) >= cfg.scaling.num_workers


def run_training(
    cfg: TrainConfig,
    *,
    resume: bool = False,
    on_event: ProgressCallback | None = None,
    ray_address: str | None = None,
) -> TrainResult:
    """Train as ``cfg`` says and export; returns the export path and the final eval loss.

    A fresh run deletes the previous run directory of the same ``run_name`` (its checkpoints
    would otherwise be resumed); ``resume=True`` continues from its latest checkpoint.
    """
    import ray
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    storage = cfg.resolved_storage_path()
    run_dir = storage / cfg.run_name
    prepared = PreparedData(run_dir / "data")
    if not resume and run_dir.exists():
        shutil.rmtree(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)

    if resume and prepared.info.is_file():
        data_info = json.loads(prepared.info.read_text())
    else:
        tokenizer_dir = resolve_model(cfg.model.init_from) if cfg.model.init_from else None
        data_info = prepare_data(
            cfg.data,
            prepared.root,
            vocab_size=cfg.tokenizer.vocab_size,
            tokenizer_dir=tokenizer_dir,
            seed=cfg.train.seed,
        )
    model_config = model_config_for(cfg, data_info["vocab_size"])
    if model_config["vocab_size"] < data_info["vocab_size"]:
        raise ValueError(
            f"model vocab_size {model_config['vocab_size']} < tokenizer's {data_info['vocab_size']}"
        )
    (run_dir / "model_config.json").write_text(json.dumps(model_config, indent=2) + "\n")

    started_ray = False
    if not ray.is_initialized():
        address = ray_address or os.environ.get("RAY_ADDRESS")
        if address:
            ray.init(address=address, include_dashboard=False, log_to_driver=False)
        else:
            # a fresh instance: a bare ray.init() would join any cluster whose address a
            # previous `ray start` left in /tmp/ray, even a dead one
            start_local_ray(include_dashboard=False, log_to_driver=False)
        started_ray = True
    progress = run_dir / "progress.jsonl"
    # a resumed run prints only what it adds to the progress file
    tail = _Tail(
        progress,
        on_event,
        start_offset=progress.stat().st_size if resume and progress.is_file() else 0,
    )
    try:
        trainer = TorchTrainer(
            train_loop_per_worker,
            train_loop_config={
                # exclude_unset: revalidating must see the same fields the user set
                "config": cfg.model_dump(mode="json", exclude_unset=True),
                "run_dir": str(run_dir),
            },
            scaling_config=ScalingConfig(
                num_workers=cfg.scaling.num_workers,
                use_gpu=_use_gpu(cfg),
                resources_per_worker={"CPU": cfg.scaling.cpus_per_worker},
            ),
            run_config=RunConfig(
                name=cfg.run_name,
                storage_path=str(storage),
                failure_config=FailureConfig(max_failures=cfg.max_failures),
                checkpoint_config=CheckpointConfig(num_to_keep=cfg.keep_checkpoints),
            ),
        )
        tail.start()
        try:
            result = trainer.fit()
        finally:
            tail.stop()
    finally:
        if started_ray:
            ray.shutdown()

    if result.checkpoint is None:
        raise RuntimeError(f"training finished without a checkpoint (run directory {run_dir})")
    with result.checkpoint.as_directory() as ckpt_dir:
        state = torch.load(Path(ckpt_dir) / STATE_FILE, map_location="cpu", weights_only=True)
    eval_loss = state.get("eval_loss")
    info = {
        "steps": state["step"],
        "eval_loss": eval_loss,
        "data": data_info,
        "config": cfg.model_dump(mode="json", exclude={"fault"}),
        "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    out = export_checkpoint(
        state["model"],
        model_config,
        prepared.tokenizer_dir,
        cfg.output_dir,
        dtype=cfg.export_dtype,
        training_info=info,
    )
    return TrainResult(
        output_dir=out,
        run_dir=run_dir,
        steps=int(state["step"]),
        eval_loss=eval_loss,
        data=data_info,
        events=tail.events,
    )
