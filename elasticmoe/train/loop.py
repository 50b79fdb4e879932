"""The per-worker training function that Ray Train runs on every worker.

Data parallel without DDP: each worker computes gradients on its share of the global batch,
then one ``all_reduce`` over a flat buffer of all gradients averages them. DDP would need
``find_unused_parameters=True`` (an expert that got no token in a step has no gradient),
which costs an extra graph traversal per step; the flat all-reduce is exact and treats a
missing gradient as zero on that rank.

Rank 0 writes progress events (one JSON object per line) to ``progress.jsonl`` in the run
directory; the driver tails that file and prints them (Ray Train V2 gives the driver no
metric stream). Checkpoints go through ``ray.train.report``, which every rank calls at the
same steps (it is a barrier); on a restart after a worker died, ``ray.train.get_checkpoint``
returns the latest one and the loop resumes at its step.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from elasticmoe.model.checkpoint import CheckpointReader
from elasticmoe.model.config import parse_config
from elasticmoe.model.registry import resolve_model
from elasticmoe.train.config import TrainConfig
from elasticmoe.train.data import PreparedData, TokenBlocks
from elasticmoe.train.modeling import TrainableMoE

__all__ = ["STATE_FILE", "ProgressLog", "lr_at", "train_loop_per_worker"]

STATE_FILE = "state.pt"


def lr_at(step: int, lr: float, min_lr: float, warmup: int, total: int) -> float:
    """Linear warmup to ``lr`` over ``warmup`` steps, then cosine decay to ``min_lr``."""
    if step < warmup:
        return lr * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return min_lr + 0.5 * (lr - min_lr) * (1 + math.cos(math.pi * min(1.0, progress)))


class ProgressLog:
    """Append-only JSON-lines progress file (written by rank 0, tailed by the driver)."""

    def __init__(self, path: Path, enabled: bool) -> None:
        self.path = path
        self.enabled = enabled

    def write(self, event: str, **fields: Any) -> None:
        """Append one event with a wall-clock timestamp."""
        if not self.enabled:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps({"event": event, "time": time.time(), **fields}) + "\n")
            f.flush()


def _all_reduce_mean(tensors: list[torch.Tensor], world: int) -> None:
    if world == 1:
        return
    flat = torch.cat([t.reshape(-1) for t in tensors])
    dist.all_reduce(flat)
    flat /= world
    offset = 0
    for t in tensors:
        t.copy_(flat[offset : offset + t.numel()].view_as(t))
        offset += t.numel()


def _average_gradients(model: torch.nn.Module, world: int) -> None:
    params = [p for p in model.parameters() if p.requires_grad]
    for p in params:
        if p.grad is None:  # an expert that got no token on this rank
            p.grad = torch.zeros_like(p)
    _all_reduce_mean([p.grad for p in params], world)


def _evaluate(
    model: TrainableMoE, blocks: TokenBlocks, cfg: TrainConfig, rank: int, world: int, device
) -> float:
    model.eval()
    total = torch.zeros(2, dtype=torch.float64, device=device)  # sum of losses*tokens, tokens
    with torch.no_grad():
        for batch in blocks.eval_batches(cfg.train.batch_size, cfg.train.eval_batches, rank, world):
            out = model(batch.to(device))
            n = batch.shape[0] * (batch.shape[1] - 1)
            total += torch.tensor([out.lm_loss.item() * n, n], dtype=torch.float64, device=device)
    if world > 1:
        dist.all_reduce(total)
    model.train()
    return float(total[0] / total[1].clamp(min=1))


def _expert_skew(tokens_per_expert: torch.Tensor) -> float:
    """Mean over MoE layers of (max / mean) tokens per expert."""
    if tokens_per_expert.numel() == 0:
        return 1.0
    t = tokens_per_expert.float()
    return float((t.max(dim=1).values / t.mean(dim=1).clamp(min=1e-9)).mean())


def _maybe_inject_fault(cfg: TrainConfig, step: int, rank: int, log: ProgressLog) -> None:
    fault = cfg.fault
    if fault is None or rank != fault.exit_rank or step != fault.exit_at_step:
        return
    marker = Path(fault.marker_file)
    if marker.exists():
        return
    marker.write_text(f"rank {rank} exited at step {step}\n")
    log.write("fault", step=step, rank=rank)
    time.sleep(fault.delay_s)
    os._exit(1)  # a hard process death, as if the node went away


def build_model(cfg: TrainConfig, model_config: dict, seed: int) -> TrainableMoE:
    """The model to train: fresh weights, or the ``init_from`` checkpoint's."""
    mc = parse_config(model_config)
    coef = float(model_config.get("router_aux_loss_coef", 0.0))
    model = TrainableMoE(mc, aux_loss_coef=coef)
    if cfg.model.init_from is not None:
        model.load_checkpoint(CheckpointReader(resolve_model(cfg.model.init_from)))
    else:
        model.init_weights(cfg.model.init_std, seed)
    return model


def _param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    decay, no_decay = [], []
    for p in model.parameters():
        (decay if p.ndim >= 2 else no_decay).append(p)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def train_loop_per_worker(args: dict[str, Any]) -> None:
    """Ray Train entry point; ``args``: ``config`` (TrainConfig dict), ``run_dir``."""
    import ray.train
    import ray.train.torch

    cfg = TrainConfig.model_validate(args["config"])
    run_dir = Path(args["run_dir"])
    prepared = PreparedData(run_dir / "data")
    model_config = json.loads((run_dir / "model_config.json").read_text())

    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    torch.set_num_threads(cfg.scaling.torch_threads or max(1, int(cfg.scaling.cpus_per_worker)))
    log = ProgressLog(run_dir / "progress.jsonl", enabled=rank == 0)
    tc = cfg.train

    torch.manual_seed(tc.seed)
    model = build_model(cfg, model_config, tc.seed).to(device)
    model.train()
    optimizer = torch.optim.AdamW(
        _param_groups(model, tc.weight_decay), lr=tc.lr, betas=tc.betas, fused=False
    )
    start_step = 0
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as ckpt_dir:
            state = torch.load(Path(ckpt_dir) / STATE_FILE, map_location=device, weights_only=True)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        start_step = int(state["step"])
    blocks = TokenBlocks(prepared, tc.seed)
    num_params = sum(p.numel() for p in model.parameters())
    log.write(
        "start",
        step=start_step,
        resumed=checkpoint is not None,
        world_size=world,
        device=str(device),
        params=num_params,
        steps=tc.steps,
    )

    tokens_per_step = tc.batch_size * cfg.data.seq_len
    window = torch.zeros(4, dtype=torch.float64)  # loss, lm_loss, aux_loss, steps
    skew = 1.0
    last_time = time.perf_counter()
    last_step = start_step
    eval_loss: float | None = None
    for step in range(start_step, tc.steps):
        _maybe_inject_fault(cfg, step, rank, log)
        lr = lr_at(step, tc.lr, tc.min_lr, tc.warmup_steps, tc.steps)
        for group in optimizer.param_groups:
            group["lr"] = lr
        batch = blocks.train_batch(step, tc.batch_size, rank, world).to(device)
        out = model(batch)
        optimizer.zero_grad(set_to_none=True)
        out.loss.backward()
        _average_gradients(model, world)
        grad_norm = float(torch.nn.utils.clip_grad_norm_(model.parameters(), tc.grad_clip))
        optimizer.step()
        window += torch.tensor(
            [out.loss.item(), out.lm_loss.item(), float(out.aux_loss), 1.0], dtype=torch.float64
        )
        skew = _expert_skew(out.tokens_per_expert)

        done = step + 1
        if done % tc.log_every == 0 or done == tc.steps:
            stats = window.to(device)  # NCCL reduces device tensors only
            if world > 1:
                dist.all_reduce(stats)  # sum over ranks; the step count sums too
            stats = stats.cpu()
            n = float(stats[3])
            now = time.perf_counter()
            log.write(
                "train",
                step=done,
                loss=float(stats[0] / n),
                lm_loss=float(stats[1] / n),
                aux_loss=float(stats[2] / n),
                lr=lr,
                grad_norm=grad_norm,
                expert_skew=skew,
                tokens_per_s=tokens_per_step * (done - last_step) / max(now - last_time, 1e-9),
            )
            window.zero_()
            last_time, last_step = now, done
        if done % tc.eval_every == 0 or done == tc.steps:
            eval_loss = _evaluate(model, blocks, cfg, rank, world, device)
            log.write("eval", step=done, eval_loss=eval_loss, perplexity=math.exp(eval_loss))
        if done % tc.checkpoint_every == 0 or done == tc.steps:
            metrics = {"step": done, "lr": lr}
            if eval_loss is not None:
                metrics["eval_loss"] = eval_loss
            with tempfile.TemporaryDirectory() as tmp:
                ckpt = None
                if rank == 0:
                    torch.save(
                        {
                            "model": model.state_dict(),
                            "optimizer": optimizer.state_dict(),
                            "step": done,
                            "eval_loss": eval_loss,
                        },
                        Path(tmp) / STATE_FILE,
                    )
                    ckpt = ray.train.Checkpoint.from_directory(tmp)
                ray.train.report(metrics, checkpoint=ckpt)
            log.write("checkpoint", step=done)
    log.write("done", step=tc.steps, eval_loss=eval_loss)
