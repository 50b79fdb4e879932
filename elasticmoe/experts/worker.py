"""``ExpertWorker``: a Ray actor on one device that serves its expert slots over gRPC.

Ray places and supervises the worker (resources from its pool: CPU, GPU, or
the custom ``NPU`` resource); the data plane does not go through Ray at all.
Routers and peers call the worker's grpc.aio server directly at the address
:meth:`ExpertWorker.start` returns, so one token batch costs one gRPC call
instead of a Ray task plus object-store round trips. Routers on the worker's own
node send their frames to its node stream instead (a Unix socket whose name its
``Health`` answer gives: :mod:`elasticmoe.experts.node_stream`).

The actor is asynchronous: the gRPC server lives on the actor's event loop and
keeps serving between (and during) Ray method calls.

Start-up runs below serving's priority: this module imports nothing heavy, and
the constructor imports torch and the expert service on a helper thread at the
deployment's ``background_priority`` (:func:`elasticmoe.experts.priority.warm_up`),
so a spare refilled under load takes the cores serving leaves idle. The threads
that serve (the event loop, gRPC's, the compute thread) are created by threads
at the priority Ray gave the process, so a spare that joins the map serves at
full priority; only its loader thread stays low (see
:class:`~elasticmoe.experts.service.ExpertServicer`).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from elasticmoe.core.experts import LogicalExpert
from elasticmoe.experts.priority import BackgroundPriority, freeze_start_up_heap, warm_up

if TYPE_CHECKING:  # imported at run time by ExpertWorker.__init__, below serving (see above)
    import torch

    from elasticmoe.experts.service import ExpertServicer, ExpertStore, Replica

__all__ = [
    "DEVICES",
    "NAMESPACE",
    "ExpertWorker",
    "actor_name",
    "actor_options",
    "resolve_device",
    "start_worker",
]

logger = logging.getLogger(__name__)

NAMESPACE = "elasticmoe"
DEVICES = ("cpu", "cuda", "npu")
# What one worker of each device kind asks Ray for when its pool says nothing.
_DEFAULT_RESOURCES: dict[str, dict[str, float]] = {
    "cpu": {"CPU": 1},
    "cuda": {"CPU": 1, "GPU": 1},
    "npu": {"CPU": 1, "NPU": 1},
}


def actor_name(worker_id: str) -> str:
    """Ray actor name of a worker (in namespace :data:`NAMESPACE`)."""
    return f"elasticmoe-worker-{worker_id}"


def resolve_device(device: str) -> torch.device:
    """The torch device for a pool's device kind, inside the worker process.

    Ray makes only the accelerators assigned to the actor visible
    (``CUDA_VISIBLE_DEVICES`` for ``num_gpus``, ``ASCEND_RT_VISIBLE_DEVICES``
    for the ``NPU`` resource), so the worker always uses index 0.
    """
    import torch

    kind = device.split(":", 1)[0]
    if kind == "cpu":
        return torch.device("cpu")
    if kind == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError(
                "device 'cuda' but this worker sees no GPU; give its pool a GPU resource "
                "(pool_resources={'GPU': 1}) and run it on a GPU node"
            )
        return torch.device("cuda", 0)
    if kind == "npu":
        try:
            import torch_npu  # noqa: F401  (registers the "npu" device with torch)
        except ImportError as e:
            raise RuntimeError(
                "device 'npu' needs the torch_npu package (Ascend) in the worker's "
                f"environment; importing it failed: {e}"
            ) from e
        return torch.device("npu", 0)
    raise ValueError(f"device {device!r} is not supported; supported: {', '.join(DEVICES)}")


def actor_options(device: str, pool_resources: Mapping[str, float] | None = None) -> dict[str, Any]:
    """Ray actor options (``num_cpus``, ``num_gpus``, ``resources``) for one worker.

    ``pool_resources`` uses Ray's resource names: ``{"CPU": 1, "GPU": 1}`` or
    ``{"CPU": 2, "NPU": 1}``; custom resources pass through. Defaults to one
    CPU plus one accelerator of the device's kind.
    """
    kind = device.split(":", 1)[0]
    if kind not in DEVICES:
        raise ValueError(f"device {device!r} is not supported; supported: {', '.join(DEVICES)}")
    resources = dict(_DEFAULT_RESOURCES[kind] if pool_resources is None else pool_resources)
    num_cpus = float(resources.pop("CPU", 1))
    num_gpus = float(resources.pop("GPU", 0))
    if kind == "cuda" and num_gpus <= 0:
        raise ValueError(
            f"device 'cuda' needs a GPU: pool_resources {dict(pool_resources or {})} has no 'GPU'"
        )
    if kind == "npu" and resources.get("NPU", 0) <= 0:
        raise ValueError(
            f"device 'npu' needs an NPU: pool_resources {dict(pool_resources or {})} has no 'NPU'"
        )
    options: dict[str, Any] = {"num_cpus": num_cpus, "num_gpus": num_gpus}
    if resources:
        options["resources"] = resources
    return options


def _slot_info(slot: int, replica: Replica | None) -> dict[str, Any] | None:
    if replica is None:
        return None
    return {
        "slot": slot,
        "layer": replica.expert.layer,
        "expert": replica.expert.expert,
        "checksum": replica.checksum,
        "nbytes": replica.nbytes,
    }


class ExpertWorker:
    """One device's expert slots, served over gRPC; run it as a Ray actor.

    The plain class is importable without Ray (and usable in-process in an
    event loop); :meth:`remote_class` or :func:`start_worker` make the actor.
    Construction is cheap; :meth:`start` opens the store, binds the server and
    loads the first experts.

    Networking: by default the server listens on 127.0.0.1 when the Ray
    cluster has a single node and on the node IP otherwise, and advertises
    that address; ``host`` overrides it; ``bind_all`` listens on 0.0.0.0 (for
    containers whose node IP is not a local interface) while still advertising
    the node address.
    """

    def __init__(
        self,
        worker_id: str,
        model_dir: str | Path,
        num_slots: int,
        device: str = "cpu",
        dtype: str = "float32",
        num_threads: int = 1,
        host: str | None = None,
        port: int = 0,
        bind_all: bool = False,
        fault_injection: bool = False,
        background_priority: BackgroundPriority = "idle",
    ) -> None:
        if num_threads < 1:
            raise ValueError(f"num_threads={num_threads} must be >= 1")
        self.background_priority = background_priority
        # the heavy imports of a fresh process, on a thread below serving's priority
        # ("unchanged" where they were imported already, e.g. in-process); a bad level is
        # a ValueError naming background_priority
        self.start_up_priority = warm_up(level=background_priority)
        import torch

        from elasticmoe.experts.faults import FaultInterceptor
        from elasticmoe.experts.wire import dtype_from_name

        self.worker_id = worker_id
        self.model_dir = Path(model_dir)
        self.num_slots = num_slots
        self.device_kind = device
        self.dtype = dtype_from_name(dtype)
        self.num_threads = num_threads
        self.host = host
        self.port = port
        self.bind_all = bind_all
        # installed only when asked: the default server has no fault hook at all
        self._faults = FaultInterceptor() if fault_injection else None
        # Several workers share a node's cores; torch's default (one thread per
        # core each) would oversubscribe them.
        torch.set_num_threads(num_threads)
        self._store: ExpertStore | None = None
        self._servicer: ExpertServicer | None = None
        self._server: Any = None
        self._node_server: Any = None
        self._address: str | None = None

    @classmethod
    def remote_class(
        cls,
        num_cpus: float = 1,
        num_gpus: float = 0,
        resources: Mapping[str, float] | None = None,
    ) -> Any:
        """The Ray actor class with these resources (``ray.remote(...)(ExpertWorker)``)."""
        import ray

        # Every method is async, so Ray runs the actor on one event loop; the
        # gRPC server started in `start` lives on it. Concurrency is bounded by
        # grpc and the servicer's threads, not by Ray calls.
        return ray.remote(
            num_cpus=num_cpus,
            num_gpus=num_gpus,
            resources=dict(resources or {}),
            max_concurrency=64,
        )(cls)

    # -- lifecycle --------------------------------------------------------

    async def start(self, experts_to_load: Iterable[tuple[int, int]] = ()) -> dict[str, Any]:
        """Open the store, start the gRPC server and load ``experts_to_load`` from the checkpoint.

        Returns :meth:`info` (``address`` is "host:port"). Calling it again on a
        started worker only loads the experts.
        """
        experts = [LogicalExpert(int(layer), int(e)) for layer, e in experts_to_load]
        if self._servicer is None:
            from elasticmoe.experts.service import (
                ExpertServicer,
                ExpertStore,
                format_address,
                serve,
            )

            device = resolve_device(self.device_kind)
            store = ExpertStore(
                self.model_dir, self.num_slots, self.dtype, device, worker_id=self.worker_id
            )
            servicer = ExpertServicer(
                store,
                num_threads=self.num_threads,
                background_priority=self.background_priority,
            )
            advertise = self.host or _default_host()
            bind = "0.0.0.0" if self.bind_all else advertise
            server, port = await serve(
                store,
                bind,
                self.port,
                servicer=servicer,
                interceptors=[self._faults] if self._faults else (),
            )
            self._store, self._servicer, self._server = store, servicer, server
            self._address = format_address(advertise, port)
            # frames from routers on this node come on a Unix socket (node_stream.py)
            from elasticmoe.experts.node_stream import NodeStreamServer

            self._node_server = NodeStreamServer(
                servicer,
                num_threads=self.num_threads,
                fault=self._faults.frame_fault if self._faults else None,
            )
            self._node_server.start()
            servicer.node_stream = self._node_server.name
            logger.info(
                "expert worker %s serving on %s (%s, %d slots)",
                self.worker_id,
                self._address,
                device,
                self.num_slots,
            )
        if experts:
            assert self._servicer is not None
            await self._servicer.load_experts(experts)
        freeze_start_up_heap()
        return await self.info()

    async def set_fault(
        self, delay_ms: float = 0.0, fail_rate: float = 0.0, load_delay_ms: float = 0.0
    ) -> dict[str, float]:
        """Delay and/or fail this worker's Forward calls, delay its LoadExperts calls
        (needs ``fault_injection=True``)."""
        if self._faults is None:
            raise RuntimeError(
                f"worker {self.worker_id} was started without fault_injection; "
                "set fault_injection: true in the deployment config"
            )
        from elasticmoe.experts.faults import FaultConfig

        self._faults.config = FaultConfig(delay_ms, fail_rate, load_delay_ms)
        return {"delay_ms": delay_ms, "fail_rate": fail_rate, "load_delay_ms": load_delay_ms}

    async def stop(self, grace: float = 5.0) -> None:
        """Stop serving: refuse new calls, let in-flight ones finish for ``grace`` seconds."""
        if self._servicer is None:
            return
        from elasticmoe.experts.service import NOT_SERVING

        self._servicer.status = NOT_SERVING
        self._servicer.end_idle_streams()
        if self._node_server is not None:
            self._node_server.stop()
            self._node_server = None
        await self._server.stop(grace)
        self._servicer.close()
        self._servicer = self._server = None

    # -- queries ----------------------------------------------------------

    async def address(self) -> str:
        """ "host:port" of the gRPC server; raises before :meth:`start`."""
        if self._address is None:
            raise RuntimeError(f"expert worker {self.worker_id} is not started")
        return self._address

    async def info(self) -> dict[str, Any]:
        """Identity, address and the slots (``None`` where free) with checksums."""
        store = self._store
        slots = [] if store is None else store.slots()
        stats = None if store is None else store.stats_snapshot()
        return {
            "worker_id": self.worker_id,
            "address": self._address,
            "device": str(store.device) if store else self.device_kind,
            "dtype": str(self.dtype).removeprefix("torch."),
            "num_slots": self.num_slots,
            "serving": self._servicer is not None,
            "slots": [_slot_info(i, r) for i, r in enumerate(slots)],
            "forward_calls": stats.forward_calls if stats else 0,
            "rows_served": stats.rows_served if stats else 0,
            "compute_seconds": stats.compute_seconds if stats else 0.0,
            **_node_identity(),
        }


def _node_identity() -> dict[str, str | None]:
    """The Ray node this worker runs on (drains and node-loss reports name nodes)."""
    import ray

    if not ray.is_initialized():
        return {"node_id": None, "node_ip": None}
    ctx = ray.get_runtime_context()
    return {"node_id": ctx.get_node_id(), "node_ip": ray.util.get_node_ip_address()}


def _default_host() -> str:
    """127.0.0.1 on a one-node Ray cluster, else this node's IP."""
    import ray

    if ray.is_initialized():
        alive = [n for n in ray.nodes() if n.get("Alive")]
        if len(alive) > 1:
            return ray.util.get_node_ip_address()
    return "127.0.0.1"


def start_worker(
    worker_id: str,
    model_dir: str | Path,
    num_slots: int,
    device: str = "cpu",
    dtype: str = "float32",
    pool_resources: Mapping[str, float] | None = None,
    experts_to_load: Sequence[tuple[int, int]] = (),
    *,
    num_threads: int = 1,
    named: bool = True,
    host: str | None = None,
    bind_all: bool = False,
    background_priority: BackgroundPriority = "idle",
    timeout: float = 300.0,
) -> tuple[Any, str]:
    """Create an :class:`ExpertWorker` actor, start it, and return ``(handle, address)``.

    The actor is named :func:`actor_name` in namespace :data:`NAMESPACE` when
    ``named``. If starting fails (bad device, checkpoint, no free slot), the
    actor is killed and the error re-raised.
    """
    import ray

    options = actor_options(device, pool_resources)
    actor_cls = ExpertWorker.remote_class(**options)
    if named:
        actor_cls = actor_cls.options(name=actor_name(worker_id), namespace=NAMESPACE)
    handle = actor_cls.remote(
        worker_id,
        str(model_dir),
        num_slots,
        device=device,
        dtype=dtype,
        num_threads=num_threads,
        host=host,
        bind_all=bind_all,
        background_priority=background_priority,
    )
    try:
        info = ray.get(handle.start.remote(list(experts_to_load)), timeout=timeout)
    except BaseException:
        ray.kill(handle)
        raise
    return handle, info["address"]
