"""ExpertWorker actors on a local Ray instance: serve over gRPC, survive a peer's death."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
import torch

from elasticmoe._proto.elasticmoe.v1 import expert_pb2, expert_pb2_grpc
from elasticmoe.control.cluster import start_local_ray
from elasticmoe.core.experts import LogicalExpert
from elasticmoe.experts.rpc import GRPC_OPTIONS
from elasticmoe.experts.weights import load_expert_weights
from elasticmoe.experts.wire import tensor_from_proto, tensor_to_proto
from elasticmoe.experts.worker import (
    NAMESPACE,
    ExpertWorker,
    actor_name,
    actor_options,
    resolve_device,
    start_worker,
)
from elasticmoe.model.checkpoint import CheckpointReader
from elasticmoe.model.config import load_config
from elasticmoe.model.init_model import init_model

ray = pytest.importorskip("ray")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("ckpt") / "mixtral-tiny"
    init_model("mixtral", "tiny", path, overwrite=True)
    return path


@pytest.fixture(scope="module")
def ray_local() -> Iterator[None]:
    start_local_ray(num_cpus=4, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


@pytest.fixture
def actors(ray_local: None) -> Iterator[list[Any]]:
    """Actor handles created by a test; all killed afterwards (by handle)."""
    handles: list[Any] = []
    yield handles
    for handle in handles:
        ray.kill(handle)


def forward(address: str, layer: int, expert: int, x: torch.Tensor) -> torch.Tensor:
    with grpc.insecure_channel(address, options=GRPC_OPTIONS) as channel:
        stub = expert_pb2_grpc.ExpertServiceStub(channel)
        request = expert_pb2.ForwardRequest(
            layer=layer,
            experts=[expert_pb2.ExpertRows(expert=expert, num_rows=x.shape[0])],
            hidden=tensor_to_proto(x),
        )
        return tensor_from_proto(stub.Forward(request, timeout=30).output)


def wait_dead(actor: Any, timeout: float = 300) -> bool:
    """Whether calls to ``actor`` fail as a dead actor's do, within ``timeout`` seconds.

    ``ray.kill`` only asks the raylet to kill the process: a call made right after
    it may still run (or time out on a loaded machine), so poll for the condition.
    """
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            ray.get(actor.info.remote(), timeout=10)
        except (ray.exceptions.RayActorError, ray.exceptions.ActorUnavailableError):
            return True
        except ray.exceptions.GetTimeoutError:
            continue
        time.sleep(0.1)
    return False


def wait_unavailable(address: str, x: torch.Tensor, timeout: float = 300) -> bool:
    """Whether Forward to ``address`` fails with UNAVAILABLE within ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            forward(address, 0, 1, x)
        except grpc.RpcError as e:
            if e.code() == grpc.StatusCode.UNAVAILABLE:
                return True
        time.sleep(0.1)
    return False


def test_two_workers_serve_and_survive_a_kill(actors: list[Any], model_dir: Path) -> None:
    a, addr_a = start_worker("a", model_dir, num_slots=2, experts_to_load=[(0, 1), (1, 3)])
    actors.append(a)
    b, addr_b = start_worker("b", model_dir, num_slots=3, experts_to_load=[(0, 2)])
    actors.append(b)
    assert addr_a.startswith("127.0.0.1:") and addr_b.startswith("127.0.0.1:")
    assert addr_a != addr_b

    info_a = ray.get(a.info.remote())
    assert info_a["worker_id"] == "a" and info_a["device"] == "cpu"
    assert info_a["address"] == addr_a == ray.get(a.address.remote())
    assert [(s["slot"], s["layer"], s["expert"]) for s in info_a["slots"]] == [(0, 0, 1), (1, 1, 3)]
    info_b = ray.get(b.info.remote())
    assert info_b["slots"][1:] == [None, None]
    # Named actors are found by id, which is how a restarted controller finds them.
    assert ray.get(ray.get_actor(actor_name("b"), namespace=NAMESPACE).address.remote()) == addr_b

    reader, config = CheckpointReader(model_dir), load_config(model_dir)
    x = torch.randn(5, config.hidden_size)
    for address, layer, expert in [(addr_a, 0, 1), (addr_a, 1, 3), (addr_b, 0, 2)]:
        want = load_expert_weights(reader, config, LogicalExpert(layer, expert), torch.float32)
        # Not bit-exact across processes: Ray starts workers with OMP_NUM_THREADS
        # set to the actor's CPUs, and the CPU GEMM kernels choose their
        # summation order by it (ULP-level differences).
        torch.testing.assert_close(forward(address, layer, expert, x), want.forward(x))
    with pytest.raises(grpc.RpcError) as err:
        forward(addr_b, 0, 1, x)  # hosted on a, not b
    assert err.value.code() == grpc.StatusCode.NOT_FOUND

    ray.kill(a)
    assert wait_dead(a)
    assert wait_unavailable(addr_a, x)
    want = load_expert_weights(reader, config, LogicalExpert(0, 2), torch.float32)
    torch.testing.assert_close(forward(addr_b, 0, 2, x), want.forward(x))
    assert ray.get(b.info.remote())["forward_calls"] == 2

    ray.get(b.stop.remote())
    with pytest.raises(grpc.RpcError) as err:
        forward(addr_b, 0, 2, x)
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    assert ray.get(b.info.remote())["serving"] is False


def test_failed_start_kills_the_actor(actors: list[Any], model_dir: Path) -> None:
    with pytest.raises(ray.exceptions.RayTaskError, match="free slot"):
        start_worker("full", model_dir, num_slots=1, experts_to_load=[(0, 1), (0, 2)])
    # The name is free again: the failed actor is gone.
    handle, _ = start_worker("full", model_dir, num_slots=1, experts_to_load=[(0, 1)])
    actors.append(handle)


def test_device_and_resources() -> None:
    assert actor_options("cpu") == {"num_cpus": 1.0, "num_gpus": 0.0}
    assert actor_options("cuda") == {"num_cpus": 1.0, "num_gpus": 1.0}
    assert actor_options("npu", {"CPU": 2, "NPU": 1}) == {
        "num_cpus": 2.0,
        "num_gpus": 0.0,
        "resources": {"NPU": 1},
    }
    with pytest.raises(ValueError, match="no 'GPU'"):
        actor_options("cuda", {"CPU": 1})
    with pytest.raises(ValueError, match="no 'NPU'"):
        actor_options("npu", {"CPU": 1})
    with pytest.raises(ValueError, match="supported: cpu, cuda, npu"):
        actor_options("tpu")
    assert resolve_device("cpu") == torch.device("cpu")
    try:
        import torch_npu  # noqa: F401
    except ImportError:
        with pytest.raises(RuntimeError, match="torch_npu"):
            resolve_device("npu")
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="sees no GPU"):
            resolve_device("cuda")
    with pytest.raises(ValueError, match="num_threads"):
        ExpertWorker("x", "/nonexistent", 1, num_threads=0)


def test_a_spare_starts_below_serving_and_serves_at_full_priority(
    actors: list[Any], model_dir: Path
) -> None:
    """Only background threads are lowered: the start-up imports and the loader thread.

    A worker started empty (how a spare starts) imported torch on a SCHED_IDLE helper
    thread; once it loads and serves (how a spare joins the map), its loader thread is
    SCHED_IDLE and every other thread, the compute thread included, keeps the priority
    Ray gave the process, so nothing has to be raised back (which an unprivileged
    process could not do).
    """
    handle, address = start_worker("spare", model_dir, num_slots=2, background_priority="idle")
    actors.append(handle)

    def priorities(worker: ExpertWorker) -> dict[str, Any]:
        import os

        from elasticmoe.experts.priority import thread_priority

        servicer = worker._servicer
        return {
            "start_up": worker.start_up_priority,
            "main": thread_priority(os.getpid()),
            "loader": servicer._io.submit(thread_priority).result(),
            "compute": servicer._compute.submit(thread_priority).result(),
            "threads": [thread_priority(int(t)) for t in os.listdir("/proc/self/task")],
        }

    ray.get(handle.start.remote([(0, 1)]))  # a load, as when the spare joins the map
    x = torch.randn(3, load_config(model_dir).hidden_size)
    forward(address, 0, 1, x)
    seen = ray.get(handle.__ray_call__.remote(priorities))
    assert seen["start_up"] == "idle"
    assert seen["loader"][0] == "idle"
    assert seen["compute"] == seen["main"] and seen["compute"][0] != "idle"
    assert [p for p in seen["threads"] if p[0] == "idle"] == [seen["loader"]]
