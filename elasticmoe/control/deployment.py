"""Start and stop a distributed deployment: controller, expert workers, engines on Ray.

``Deployment.start`` connects to Ray (``RAY_ADDRESS`` or a new local
instance), starts the controller (a named, restartable actor), which starts
the expert workers and publishes expert map epoch 1, then starts the engines.
``shutdown`` leaves no actor behind.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import time
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from elasticmoe.control.cluster import (
    CONTROLLER_NAME,
    ENGINE_PREFIX,
    NAMESPACE,
    start_local_ray,
    worker_actor_name,
)
from elasticmoe.control.deployment_config import DeploymentConfig
from elasticmoe.core.expert_map import ExpertMap
from elasticmoe.engine.request import RequestOutput, SamplingParams

logger = logging.getLogger(__name__)

__all__ = ["Deployment", "DeploymentConfig"]


class Deployment:
    """The Ray actors of one model: controller, expert workers and engines."""

    def __init__(
        self, config: DeploymentConfig, progress: bool = True, fault: dict | None = None
    ) -> None:
        self.config = config.model_copy(update={"model": str(Path(config.model).resolve())})
        self.progress = progress
        self.fault = fault
        self.controller: Any = None
        self.engines: list[Any] = []
        self._started_ray = False
        self._console = Console(stderr=True)

    @property
    def controller_name(self) -> str:
        """Ray actor name of this deployment's controller."""
        return f"{CONTROLLER_NAME}-{self.config.name}"

    # ------------------------------------------------------------- start-up
    def _init_ray(self) -> None:
        import ray

        if ray.is_initialized():
            return
        address = self.config.ray_address or os.environ.get("RAY_ADDRESS")
        if address:
            ray.init(address=address, namespace=NAMESPACE, log_to_driver=False)
        else:
            from elasticmoe.experts.rpc import fresh_token_in_environment

            c = self.config
            # logical CPUs: room for the initial actors plus a few added workers
            needed = sum(p.num_workers * p.worker_num_cpus for p in c.worker_pools())
            needed += c.num_engines * c.engine_num_cpus
            # This Ray instance is ours: every actor inherits the raylet's environment,
            # so a token made for it authenticates the deployment's gRPC.
            with fresh_token_in_environment():
                # a new instance even if another Ray cluster on this machine was started last
                start_local_ray(
                    num_cpus=max(os.cpu_count() or 1, math.ceil(needed) + 4),
                    # a pool's custom labels (not accelerators) exist on this one
                    # machine, room for every pool's max_workers
                    resources=local_pool_resources(c) or None,
                    namespace=NAMESPACE,
                    include_dashboard=False,
                    log_to_driver=False,
                    # Ray starts its worker processes (our engines, HTTP front and expert
                    # workers) at nice 15 unless told otherwise: then any other process on
                    # the machine, a load generator included, takes the CPU from serving.
                    _system_config={"worker_niceness": c.ray_worker_niceness},
                )
            self._started_ray = True

    def start(self) -> Deployment:
        """Start the controller (which starts workers and publishes epoch 1), then engines."""
        import ray

        from elasticmoe.control.controller import Controller
        from elasticmoe.engine.actor import EngineActor

        c = self.config
        self._init_ray()
        if c.mode == "local":
            return self._start_local()
        try:
            with self._progress() as progress:
                task = progress.add_task(f"loading experts on {c.num_workers} workers", total=None)
                self.controller = (
                    ray.remote(Controller)
                    .options(
                        name=self.controller_name,
                        namespace=NAMESPACE,
                        max_restarts=-1,
                        max_concurrency=32,
                        num_cpus=0,
                    )
                    .remote(c.model_dump(), self.fault)
                )
                expert_map = ray.get(
                    self.controller.bootstrap.remote(), timeout=c.worker_start_timeout_s
                )
                progress.update(task, total=1, completed=1)

            mc_dtype = ray.get(self.controller.dtype.remote())
            engine_cls = ray.remote(
                num_cpus=c.engine_num_cpus,
                num_gpus=c.engine_num_gpus or (1 if c.device == "cuda" else 0),
                max_concurrency=512,
            )(EngineActor)
            engine_cfg = {"model": c.model, "dtype": mc_dtype, **c.engine}
            if c.device == "cuda":
                engine_cfg.setdefault("device", "cuda")
            self.engines = [
                engine_cls.options(
                    name=f"{ENGINE_PREFIX}{c.name}-{i}",
                    namespace=NAMESPACE,
                    max_restarts=-1,  # a dead engine comes back (and pulls the current map)
                    # the engine blocks on expert RPCs; spinning OpenMP threads
                    # would take the cores the workers need
                    runtime_env={"env_vars": {"OMP_WAIT_POLICY": "PASSIVE"}},
                ).remote(
                    f"e{i}",
                    engine_cfg,
                    expert_map,
                    c.router,
                    c.engine_threads,
                    self.controller_name,
                    c.map_poll_s,
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
            m = self.expert_map
            self._console.print(
                f"[green]ready[/green]: {len(m.workers)} expert workers "
                f"({m.num_replicas} replicas of {len(m.replicas)} experts), "
                f"{c.num_engines} engine(s), expert map epoch {m.epoch}"
            )
        return self

    def _start_local(self) -> Deployment:
        """Engines with every expert in-process: no workers, no controller."""
        import ray

        from elasticmoe.engine.actor import EngineActor

        c = self.config
        engine_cls = ray.remote(num_cpus=c.engine_num_cpus, max_concurrency=512)(EngineActor)
        try:
            self.engines = [
                engine_cls.options(name=f"{ENGINE_PREFIX}{c.name}-{i}", namespace=NAMESPACE).remote(
                    f"e{i}",
                    {"model": c.model, "dtype": c.dtype, **c.engine},
                    None,
                    None,
                    c.engine_threads,
                )
                for i in range(c.num_engines)
            ]
            with self._progress() as progress:
                task = progress.add_task("loading the model", total=len(self.engines))
                for engine in self.engines:
                    ray.get(engine.ready.remote(), timeout=600)
                    progress.advance(task)
        except BaseException:
            self.shutdown()
            raise
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

    # ------------------------------------------------------------ queries
    @property
    def expert_map(self) -> ExpertMap:
        """The controller's current expert map (distributed mode only)."""
        import ray

        if self.controller is None:
            raise RuntimeError("no expert map: this deployment runs in local mode")
        return ExpertMap.from_dict(ray.get(self.controller.get_map.remote()))

    @property
    def workers(self) -> dict[str, Any]:
        """Worker id -> actor handle."""
        import ray

        return {
            w: ray.get_actor(worker_actor_name(self.config.name, w), namespace=NAMESPACE)
            for w in self.expert_map.workers
        }

    def generate(self, prompts: list, params: list[SamplingParams]) -> list[RequestOutput]:
        """Spread prompts over the engines (round-robin) and gather outputs in order."""

        n = len(self.engines)
        refs = {
            i: self.engines[i].generate_batch.remote(prompts[i::n], params[i::n]) for i in range(n)
        }
        out: list[RequestOutput] = [None] * len(prompts)  # type: ignore[list-item]
        for i, ref in refs.items():
            out[i::n] = self._get_with_failover(ref, i, prompts[i::n], params[i::n])
        return out

    def _get_with_failover(self, ref: Any, engine_index: int, prompts: list, params: list) -> list:
        """Results of one engine's share; if that engine died, run the share again elsewhere.

        Ray restarts a dead engine, so "elsewhere" is the next engine, or the
        same one once it is back. Requests that had not finished are recomputed
        from their prompts (greedy and seeded sampling give the same tokens).
        """
        import ray

        attempts = 0
        while True:
            try:
                return ray.get(ref)
            except ray.exceptions.RayActorError as e:
                attempts += 1
                if attempts > 3:
                    raise RuntimeError(
                        f"engine failed {attempts} times running these requests: {e}"
                    ) from e
                logger.warning(
                    "engine %d died; retrying its %d request(s)", engine_index, len(prompts)
                )
                engine_index = (engine_index + 1) % len(self.engines)
                ref = self.engines[engine_index].generate_batch.remote(prompts, params)

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
            except ray.exceptions.RayError as e:  # a dead engine cannot drain; kill it anyway
                logger.warning("engine shutdown failed: %s", e)
            ray.kill(engine)
        self.engines = []
        if self.controller is not None:
            try:
                ray.get(self.controller.shutdown.remote(), timeout=60)
            except ray.exceptions.RayError as e:  # dead or hung: kill its workers by name
                logger.warning("controller shutdown failed: %s", e)
                self._kill_workers_by_name()
            ray.kill(self.controller, no_restart=True)
            self.controller = None
        if self._started_ray:
            ray.shutdown()
            self._started_ray = False

    def _kill_workers_by_name(self) -> None:
        """Last resort when the controller is gone: kill detached workers by name."""
        import ray

        for entry in ray.util.list_named_actors(all_namespaces=True):
            if entry.get("namespace") == NAMESPACE and entry["name"].startswith(
                worker_actor_name(self.config.name, "")
            ):
                with contextlib.suppress(ValueError):
                    ray.kill(ray.get_actor(entry["name"], namespace=NAMESPACE))


def local_pool_resources(config: DeploymentConfig) -> dict[str, float]:
    """Custom Ray resources a local Ray instance needs for the pools' workers to start:
    every pool's label resources for its max_workers (accelerators, NPU included, are
    real devices Ray finds or not, never made up here)."""
    out: dict[str, float] = {}
    for pool in config.worker_pools():
        for name, amount in pool.worker_resources.items():
            if name not in ("NPU", "GPU", "CPU"):
                out[name] = out.get(name, 0.0) + amount * pool.max_workers
    return out
