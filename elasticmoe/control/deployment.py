"""Start and stop a distributed deployment: expert workers and engine actors on Ray.

``Deployment.start`` connects to Ray (``RAY_ADDRESS`` or a new local
instance), starts the expert workers with their initial replicas, publishes
expert map epoch 1 and starts the engines. ``shutdown`` leaves no actor
behind.
"""

from __future__ import annotations

import logging
import math
import os
import time
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from elasticmoe.control.placement import initial_placement
from elasticmoe.engine.request import RequestOutput, SamplingParams
from elasticmoe.experts.weights import LogicalExpert
from elasticmoe.model.config import load_config
from elasticmoe.router.expert_map import ExpertMap

logger = logging.getLogger(__name__)
NAMESPACE = "elasticmoe"


class DeploymentConfig(BaseModel):
    """Shape of a distributed deployment (engine settings go in ``engine``)."""

    model_config = ConfigDict(extra="forbid")

    model: str
    num_workers: int = Field(2, ge=1)
    num_engines: int = Field(1, ge=1)
    slots_per_worker: int | None = Field(
        None, ge=1, description="default: room for the initial replicas plus 25% spare"
    )
    replicas_per_expert: int = Field(1, ge=1)
    # "layer:expert" -> number of replicas, overriding replicas_per_expert
    expert_replicas: dict[str, int] = Field(default_factory=dict)
    device: Literal["cpu", "cuda", "npu"] = "cpu"
    dtype: Literal["float32", "bfloat16", "float16", "auto"] = "auto"
    worker_num_cpus: float = Field(1.0, ge=0)
    worker_num_gpus: float = Field(0.0, ge=0)
    worker_resources: dict[str, float] = Field(default_factory=dict)
    worker_threads: int = Field(1, ge=1)
    engine_num_cpus: float = Field(1.0, ge=0)
    engine_num_gpus: float = Field(0.0, ge=0)
    engine_threads: int | None = Field(None, ge=1)
    engine: dict[str, Any] = Field(default_factory=dict)
    router: dict[str, Any] = Field(default_factory=dict)
    ray_address: str | None = None

    def replica_counts(self, experts: list[LogicalExpert]) -> dict[LogicalExpert, int]:
        """Replicas of every logical expert (validated against the model)."""
        counts = {e: self.replicas_per_expert for e in experts}
        for key, n in self.expert_replicas.items():
            try:
                layer, expert = (int(x) for x in key.split(":"))
            except ValueError:
                raise ValueError(
                    f"expert_replicas key {key!r}: expected 'layer:expert', e.g. '0:3'"
                ) from None
            if LogicalExpert(layer, expert) not in counts:
                raise ValueError(f"expert_replicas key {key!r}: no such expert in the model")
            counts[LogicalExpert(layer, expert)] = n
        return counts


class Deployment:
    """The Ray actors of one model: expert workers + engines, and the expert map."""

    def __init__(self, config: DeploymentConfig, progress: bool = True) -> None:
        self.config = config
        self.progress = progress
        self.model_dir = str(Path(config.model).resolve())
        self.workers: dict[str, Any] = {}  # worker id -> actor handle
        self.engines: list[Any] = []
        self.expert_map: ExpertMap | None = None
        self.num_slots = 0
        self._started_ray = False
        self._console = Console(stderr=True)

    # ------------------------------------------------------------- start-up
    def _init_ray(self) -> None:
        import ray

        if ray.is_initialized():
            return
        address = self.config.ray_address or os.environ.get("RAY_ADDRESS")
        if address:
            ray.init(address=address, namespace=NAMESPACE, log_to_driver=False)
        else:
            c = self.config
            needed = c.num_workers * c.worker_num_cpus + c.num_engines * c.engine_num_cpus
            ray.init(
                num_cpus=max(os.cpu_count() or 1, math.ceil(needed)),
                namespace=NAMESPACE,
                include_dashboard=False,
                log_to_driver=False,
            )
            self._started_ray = True

    def start(self) -> Deployment:
        """Start workers, publish the first expert map, start engines."""
        import ray

        from elasticmoe.engine.actor import EngineActor
        from elasticmoe.experts.worker import ExpertWorker, actor_name

        c = self.config
        self._init_ray()
        mc = load_config(self.model_dir)
        experts = [
            LogicalExpert(layer, e) for layer in mc.moe_layers for e in range(mc.num_experts)
        ]
        counts = c.replica_counts(experts)
        worker_ids = [f"w{i}" for i in range(c.num_workers)]
        total = sum(counts.values())
        self.num_slots = c.slots_per_worker or math.ceil(1.25 * total / c.num_workers)
        placement = initial_placement(experts, worker_ids, self.num_slots, counts)
        dtype = c.dtype if c.dtype != "auto" else mc.raw.get("dtype") or "float32"

        resources = dict(c.worker_resources)
        if c.device == "npu":
            resources.setdefault("NPU", 1)
        worker_cls = ExpertWorker.remote_class(
            num_cpus=c.worker_num_cpus,
            num_gpus=c.worker_num_gpus or (1 if c.device == "cuda" else 0),
            resources=resources,
        )
        try:
            for wid in worker_ids:
                self.workers[wid] = worker_cls.options(
                    name=actor_name(wid), namespace=NAMESPACE
                ).remote(
                    wid,
                    self.model_dir,
                    self.num_slots,
                    device=c.device,
                    dtype=dtype,
                    num_threads=c.worker_threads,
                )
            pending = {
                self.workers[wid].start.remote(
                    [tuple(e) for e, ws in placement.items() if wid in ws]
                ): wid
                for wid in worker_ids
            }
            addresses: dict[str, str] = {}
            with self._progress() as progress:
                task = progress.add_task(
                    f"loading experts on {c.num_workers} workers", total=len(pending)
                )
                while pending:
                    done, _ = ray.wait(list(pending), num_returns=1, timeout=600)
                    if not done:
                        raise TimeoutError("expert workers did not start within 600s")
                    info = ray.get(done[0])
                    addresses[pending.pop(done[0])] = info["address"]
                    progress.advance(task)
            self.expert_map = ExpertMap(1, placement, addresses)

            engine_cls = ray.remote(
                num_cpus=c.engine_num_cpus,
                num_gpus=c.engine_num_gpus or (1 if c.device == "cuda" else 0),
                max_concurrency=512,
            )(EngineActor)
            engine_cfg = {"model": self.model_dir, "dtype": dtype, **c.engine}
            if c.device == "cuda":
                engine_cfg.setdefault("device", "cuda")
            self.engines = [
                engine_cls.options(name=f"elasticmoe-engine-{i}", namespace=NAMESPACE).remote(
                    f"e{i}", engine_cfg, self.expert_map.to_dict(), c.router, c.engine_threads
                )
                for i in range(c.num_engines)
            ]
            with self._progress() as progress:
                task = progress.add_task(
                    f"starting {c.num_engines} engine(s)", total=len(self.engines)
                )
                for engine in self.engines:
                    ray.get(engine.ready.remote(), timeout=600)
                    progress.advance(task)
        except BaseException:
            self.shutdown()
            raise
        if self.progress:
            self._console.print(
                f"[green]ready[/green]: {c.num_workers} expert workers "
                f"({total} replicas of {len(experts)} experts, {self.num_slots} slots each), "
                f"{c.num_engines} engine(s), expert map epoch {self.expert_map.epoch}"
            )
        return self

    def _progress(self) -> Progress:
        return Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            console=self._console,
            disable=not self.progress,
            transient=True,
        )

    # ------------------------------------------------------------ requests
    def generate(self, prompts: list, params: list[SamplingParams]) -> list[RequestOutput]:
        """Spread prompts over the engines (round-robin) and gather outputs in order."""
        import ray

        n = len(self.engines)
        refs = [
            self.engines[i].generate_batch.remote(prompts[i::n], params[i::n]) for i in range(n)
        ]
        per_engine = ray.get(refs)
        out: list[RequestOutput] = [None] * len(prompts)  # type: ignore[list-item]
        for i, results in enumerate(per_engine):
            out[i::n] = results
        return out

    def publish(self, new_map: ExpertMap) -> None:
        """Push a new expert map to every engine."""
        import ray

        self.expert_map = new_map
        ray.get([e.update_map.remote(new_map.to_dict()) for e in self.engines])

    def engine_stats(self) -> list[dict[str, Any]]:
        """Stats of every engine."""
        import ray

        return ray.get([e.stats.remote() for e in self.engines])

    # ------------------------------------------------------------ shutdown
    def shutdown(self, timeout: float = 30.0) -> None:
        """Drain engines (bounded), stop workers, kill every actor; stop Ray if we started it."""
        import ray

        if not ray.is_initialized():
            return
        deadline = time.monotonic() + timeout
        for engine in self.engines:
            try:
                ray.get(
                    engine.shutdown.remote(timeout), timeout=max(1.0, deadline - time.monotonic())
                )
            except Exception as e:  # a dead engine cannot drain; kill it anyway
                logger.warning("engine shutdown failed: %s", e)
            ray.kill(engine)
        for handle in self.workers.values():
            try:
                ray.get(handle.stop.remote(1.0), timeout=5)
            except Exception as e:
                logger.info("worker stop failed (already dead?): %s", e)
            ray.kill(handle)
        self.engines, self.workers = [], {}
        if self._started_ray:
            ray.shutdown()
            self._started_ray = False
