"""The expert service over real gRPC: Forward, load/unload, peer copies, bad requests.

Servers run in-process on 127.0.0.1 inside one background asyncio loop (the
way a worker actor runs them); tests talk to them with the synchronous gRPC
client, as a separate process would.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable, Coroutine, Iterator
from pathlib import Path
from typing import Any, TypeVar

import grpc
import numpy as np
import pytest
import torch

from elasticmoe._proto.elasticmoe.v1 import expert_pb2, expert_pb2_grpc
from elasticmoe.core.experts import LogicalExpert
from elasticmoe.experts import service
from elasticmoe.experts.rpc import GRPC_OPTIONS
from elasticmoe.experts.service import (
    ChecksumMismatchError,
    ExpertServicer,
    ExpertStore,
    IncompatibleExpertError,
    StoreFullError,
    serve,
)
from elasticmoe.experts.weights import ExpertWeights, load_expert_weights
from elasticmoe.experts.wire import WireError, tensor_from_proto, tensor_to_proto
from elasticmoe.model.checkpoint import CheckpointReader
from elasticmoe.model.config import load_config
from elasticmoe.model.init_model import init_model

T = TypeVar("T")
Code = grpc.StatusCode

# Forward views request bytes without copying; torch warns once about the
# read-only buffer (the service silences it outside pytest's own filters).
pytestmark = pytest.mark.filterwarnings("ignore:The given buffer is not writable")


class LoopThread:
    """An asyncio loop in a daemon thread, for grpc.aio servers under sync tests."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

    def run(self, coro: Coroutine[Any, Any, T], timeout: float = 30) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()


class Server:
    """One started server and a sync client stub for it."""

    def __init__(self, loop: LoopThread, store: ExpertStore) -> None:
        self.loop = loop
        self.store = store
        self.servicer = ExpertServicer(store, num_threads=1)
        self.server, self.port = loop.run(serve(store, servicer=self.servicer))
        self.address = f"127.0.0.1:{self.port}"
        self.channel = grpc.insecure_channel(self.address, options=GRPC_OPTIONS)
        self.stub = expert_pb2_grpc.ExpertServiceStub(self.channel)

    def stop(self) -> None:
        self.channel.close()
        self.loop.run(self.server.stop(grace=1))
        self.servicer.close()

    def load(
        self, *experts: tuple[int, int], source: str = "", peer: Server | None = None
    ) -> expert_pb2.LoadExpertsResponse:
        """Load from the checkpoint, ``source``, or ``peer`` with the checksums of its
        replicas as the controller would have recorded them ("unrecorded" where it has none)."""
        refs = [expert_pb2.ExpertRef(layer=layer, expert=e) for layer, e in experts]
        checksums = []
        if peer is not None:
            source = peer.address
            held = [peer.store.get(LogicalExpert(layer, e)) for layer, e in experts]
            checksums = [r.checksum if r is not None else "unrecorded" for r in held]
        return self.stub.LoadExperts(
            expert_pb2.LoadExpertsRequest(experts=refs, source=source, checksums=checksums),
            timeout=30,
        )

    def forward(
        self, layer: int, rows: list[tuple[int, int]], hidden: torch.Tensor, **tensor_fields: Any
    ) -> torch.Tensor:
        msg = tensor_to_proto(hidden)
        for key, value in tensor_fields.items():
            if key == "shape":
                del msg.shape[:]
                msg.shape.extend(value)
            else:
                setattr(msg, key, value)
        request = expert_pb2.ForwardRequest(
            layer=layer,
            experts=[expert_pb2.ExpertRows(expert=e, num_rows=n) for e, n in rows],
            hidden=msg,
            epoch=7,
        )
        response = self.stub.Forward(request, timeout=30)
        return tensor_from_proto(response.output)

    def health(self) -> expert_pb2.HealthResponse:
        return self.stub.Health(expert_pb2.HealthRequest(), timeout=10)

    def stats(self) -> expert_pb2.StatsResponse:
        return self.stub.Stats(expert_pb2.StatsRequest(), timeout=10)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("ckpt") / "mixtral-tiny"
    init_model("mixtral", "tiny", path, overwrite=True)
    return path


@pytest.fixture(scope="module")
def loop() -> Iterator[LoopThread]:
    lt = LoopThread()
    yield lt
    lt.close()


@pytest.fixture
def start(loop: LoopThread, model_dir: Path) -> Iterator[Callable[..., Server]]:
    """Factory: start a server over a fresh store; every server is stopped afterwards."""
    servers: list[Server] = []

    def _start(num_slots: int = 4, dtype: torch.dtype = torch.float32, worker_id: str = "w0"):
        store = ExpertStore(model_dir, num_slots, dtype=dtype, worker_id=worker_id)
        servers.append(Server(loop, store))
        return servers[-1]

    yield _start
    for s in servers:
        s.stop()


def reference(model_dir: Path, expert: LogicalExpert, dtype: torch.dtype) -> ExpertWeights:
    reader = CheckpointReader(model_dir)
    return load_expert_weights(reader, load_config(model_dir), expert, dtype)


def expect_error(code: grpc.StatusCode, fn: Callable[[], Any], *needles: str) -> str:
    with pytest.raises(grpc.RpcError) as info:
        fn()
    err = info.value
    assert err.code() == code, f"{err.code()}: {err.details()}"
    for needle in needles:
        assert needle in err.details(), err.details()
    return err.details()


# ---------------------------------------------------------------------------
# Forward


def test_forward_matches_local_experts_fp32(start: Callable[..., Server], model_dir: Path) -> None:
    s = start()
    infos = s.load((0, 1), (0, 5), (1, 2)).experts
    assert [(i.layer, i.expert) for i in infos] == [(0, 1), (0, 5), (1, 2)]
    hidden_size = load_config(model_dir).hidden_size
    torch.manual_seed(0)
    rows = [(5, 3), (1, 0), (1, 4)]  # an expert twice and one with no rows
    hidden = torch.randn(7, hidden_size)
    out = s.forward(0, rows, hidden)
    assert out.shape == (7, hidden_size) and out.dtype == torch.float32
    start_row = 0
    for e, n in rows:
        want = reference(model_dir, LogicalExpert(0, e), torch.float32).forward(
            hidden[start_row : start_row + n]
        )
        assert torch.equal(out[start_row : start_row + n], want), f"expert 0:{e}"
        start_row += n

    out1 = s.forward(1, [(2, 2)], hidden[:2])
    assert torch.equal(
        out1, reference(model_dir, LogicalExpert(1, 2), torch.float32).forward(hidden[:2])
    )

    stats = s.stats()
    assert stats.forward_calls == 2 and stats.rows_served == 9 and stats.num_slots == 4
    assert dict(stats.rows_per_expert) == {"0:5": 3, "0:1": 4, "1:2": 2}
    assert stats.compute_seconds > 0
    assert [(i.layer, i.expert, i.checksum) for i in stats.experts] == [
        (i.layer, i.expert, i.checksum) for i in infos
    ]


def test_forward_empty_batch(start: Callable[..., Server], model_dir: Path) -> None:
    s = start()
    s.load((0, 1))
    hidden_size = load_config(model_dir).hidden_size
    assert s.forward(0, [], torch.zeros(0, hidden_size)).shape == (0, hidden_size)
    assert s.forward(0, [(1, 0)], torch.zeros(0, hidden_size)).shape == (0, hidden_size)


def test_batch_larger_than_grpc_default_limit(
    start: Callable[..., Server], model_dir: Path
) -> None:
    s = start()
    s.load((1, 1))
    x = torch.randn(20_000, load_config(model_dir).hidden_size)  # 5 MB > grpc's 4 MB default
    out = s.forward(1, [(1, x.shape[0])], x)
    assert torch.equal(out, reference(model_dir, LogicalExpert(1, 1), torch.float32).forward(x))


def test_bfloat16_store(start: Callable[..., Server], model_dir: Path) -> None:
    s = start(dtype=torch.bfloat16)
    info = s.load((1, 6)).experts[0]
    ref = reference(model_dir, LogicalExpert(1, 6), torch.bfloat16)
    assert info.checksum == ref.checksum() and info.nbytes == ref.nbytes()
    hidden = torch.randn(5, load_config(model_dir).hidden_size).to(torch.bfloat16)
    out = s.forward(1, [(6, 5)], hidden)
    assert out.dtype == torch.bfloat16
    assert torch.equal(out, ref.forward(hidden))
    # An fp32 batch to a bf16 worker is a caller bug, not something to cast silently.
    expect_error(Code.INVALID_ARGUMENT, lambda: s.forward(1, [(6, 5)], hidden.float()), "bfloat16")


# ---------------------------------------------------------------------------
# Bad requests: each gets a clear status, and the server keeps serving


def test_bad_forward_requests(start: Callable[..., Server], model_dir: Path) -> None:
    s = start()
    s.load((0, 1), (0, 2))
    h = load_config(model_dir).hidden_size
    x = torch.randn(4, h)

    expect_error(Code.NOT_FOUND, lambda: s.forward(0, [(7, 4)], x), "0:7", "w0", "epoch 7")
    expect_error(Code.NOT_FOUND, lambda: s.forward(5, [(1, 4)], x), "5:1", "not an MoE layer")
    expect_error(Code.NOT_FOUND, lambda: s.forward(0, [(1, 2), (99, 2)], x), "0:99")
    expect_error(
        Code.INVALID_ARGUMENT, lambda: s.forward(0, [(1, 4)], x.half()), "hidden.dtype", "float16"
    )
    expect_error(Code.INVALID_ARGUMENT, lambda: s.forward(0, [(1, 4)], x, dtype="int8"), "'int8'")
    expect_error(
        Code.INVALID_ARGUMENT,
        lambda: s.forward(0, [(1, 4)], torch.randn(4, h - 1)),
        "hidden.shape",
        str(h),
    )
    expect_error(
        Code.INVALID_ARGUMENT,
        lambda: s.forward(0, [(1, 4)], torch.randn(4, 1, h)),
        "must be [rows, 64]",
    )
    expect_error(
        Code.INVALID_ARGUMENT,
        lambda: s.forward(0, [(1, 4)], x, data=tensor_to_proto(x).data[:-3]),
        "bytes",
    )
    expect_error(Code.INVALID_ARGUMENT, lambda: s.forward(0, [(1, 4)], x, shape=[5, h]), "bytes")
    expect_error(
        Code.INVALID_ARGUMENT, lambda: s.forward(0, [(1, 4)], x, shape=[-4, h]), "negative"
    )
    # a huge shape vector is refused before any arithmetic on it
    expect_error(
        Code.INVALID_ARGUMENT, lambda: s.forward(0, [(1, 4)], x, shape=[1] * 60_000), "at most 8"
    )
    expect_error(
        Code.INVALID_ARGUMENT,
        lambda: s.forward(0, [(1, 4)], x, shape=[2**40, 2**40, h]),
        "elements",
    )
    expect_error(
        Code.INVALID_ARGUMENT, lambda: s.forward(0, [(1, 2), (2, 1)], x), "sum to 3", "4 rows"
    )
    expect_error(
        Code.INVALID_ARGUMENT, lambda: s.forward(0, [(1, 6), (2, -2)], x), "experts[1]", "negative"
    )
    expect_error(Code.INVALID_ARGUMENT, lambda: s.forward(0, [], x), "experts is empty")
    missing_hidden = expert_pb2.ForwardRequest(
        layer=0, experts=[expert_pb2.ExpertRows(expert=1, num_rows=1)]
    )
    expect_error(
        Code.INVALID_ARGUMENT,
        lambda: s.stub.Forward(missing_hidden, timeout=10),
        "hidden.dtype is not set",
    )

    health = s.health()
    assert (health.status, health.worker_id, health.num_experts) == ("SERVING", "w0", 2)
    assert torch.equal(
        s.forward(0, [(2, 4)], x),
        reference(model_dir, LogicalExpert(0, 2), torch.float32).forward(x),
    )
    assert s.stats().forward_calls == 1  # rejected requests are not counted


def test_garbage_message_bytes(start: Callable[..., Server]) -> None:
    s = start()
    # Identity (de)serializers: the bytes go out exactly as given.
    raw = s.channel.unary_unary("/elasticmoe.v1.ExpertService/Forward")
    # Field 3 (hidden) claims a 2**35-byte payload: not parseable protobuf.
    garbage = b"\x08\x01\x1a\xff\xff\xff\xff\x7f\x00\x01"
    expect_error(
        Code.INVALID_ARGUMENT,
        lambda: raw(garbage, timeout=10),
        "not a valid elasticmoe.v1.ForwardRequest",
    )
    fetch = s.channel.unary_stream("/elasticmoe.v1.ExpertService/FetchExpert")
    expect_error(Code.INVALID_ARGUMENT, lambda: list(fetch(garbage, timeout=10)), "ExpertRef")
    assert s.health().status == "SERVING"


def test_health_answers_while_computing(start: Callable[..., Server], model_dir: Path) -> None:
    s = start()
    s.load((0, 1))
    release, entered = threading.Event(), threading.Event()
    real_forward = s.store.forward

    def slow_forward(*args: Any) -> torch.Tensor:
        entered.set()
        assert release.wait(30)
        return real_forward(*args)

    s.store.forward = slow_forward  # type: ignore[method-assign]
    x = torch.randn(3, load_config(model_dir).hidden_size)
    request = expert_pb2.ForwardRequest(
        layer=0, experts=[expert_pb2.ExpertRows(expert=1, num_rows=3)], hidden=tensor_to_proto(x)
    )
    pending = s.stub.Forward.future(request, timeout=30)
    try:
        assert entered.wait(10)
        assert s.health().status == "SERVING"  # not queued behind the forward
        assert s.stats().num_slots == 4
    finally:
        release.set()
    assert tensor_from_proto(pending.result().output).shape == (3, x.shape[1])


# ---------------------------------------------------------------------------
# Load / unload / slots


def test_load_unload(start: Callable[..., Server], model_dir: Path) -> None:
    s = start(num_slots=3)
    first = s.load((0, 3), (1, 0)).experts
    assert first[0].checksum == reference(model_dir, LogicalExpert(0, 3), torch.float32).checksum()
    assert first[0].nbytes == reference(model_dir, LogicalExpert(0, 3), torch.float32).nbytes()
    again = s.load((1, 0), (0, 3), (1, 0)).experts  # present: no-op, duplicates collapse
    assert [(i.layer, i.expert, i.checksum) for i in again] == [
        (1, 0, first[1].checksum),
        (0, 3, first[0].checksum),
    ]
    assert s.health().num_experts == 2
    assert [r.slot for r in s.store.replicas()] == [0, 1]

    refs = [expert_pb2.ExpertRef(layer=0, expert=3), expert_pb2.ExpertRef(layer=0, expert=4)]
    unloaded = s.stub.UnloadExperts(expert_pb2.UnloadExpertsRequest(experts=refs), timeout=10)
    assert unloaded.num_unloaded == 1
    h = load_config(model_dir).hidden_size
    expect_error(Code.NOT_FOUND, lambda: s.forward(0, [(3, 1)], torch.randn(1, h)), "0:3")
    # The freed slot is reused first.
    s.load((1, 7))
    assert [(r.slot, str(r.expert)) for r in s.store.replicas()] == [(0, "1:7"), (1, "1:0")]

    expect_error(Code.NOT_FOUND, lambda: s.load((0, 8)), "0:8", "0..7")
    expect_error(Code.NOT_FOUND, lambda: s.load((9, 0)), "9:0", "not an MoE layer")
    expect_error(Code.INVALID_ARGUMENT, lambda: s.load((0, 1), source="nowhere"), "host:port")


def test_slot_exhaustion(start: Callable[..., Server]) -> None:
    s = start(num_slots=2)
    # More than fits at once: nothing is loaded.
    expect_error(
        Code.RESOURCE_EXHAUSTED, lambda: s.load((0, 0), (0, 1), (0, 2)), "w0", "cannot load 3"
    )
    assert s.health().num_experts == 0
    s.load((0, 0), (0, 1))
    expect_error(Code.RESOURCE_EXHAUSTED, lambda: s.load((0, 2)), "0 free slot(s) of 2")
    s.load((0, 1))  # already present: still fine on a full worker
    assert s.health().num_experts == 2


def test_store_full_and_checksum_errors_directly(model_dir: Path) -> None:
    store = ExpertStore(model_dir, num_slots=1)
    store.load_from_checkpoint(LogicalExpert(0, 0))
    with pytest.raises(StoreFullError, match="0 free slot"):
        store.load_from_checkpoint(LogicalExpert(0, 1))
    w = reference(model_dir, LogicalExpert(0, 1), torch.float32)
    store.unload(LogicalExpert(0, 0))
    with pytest.raises(ChecksumMismatchError, match="nothing was installed"):
        store.install(LogicalExpert(0, 1), w, "0" * 64)
    assert store.replicas() == []
    wrong = ExpertWeights(w.gate_up[:, :-1].contiguous(), w.down)
    with pytest.raises(IncompatibleExpertError, match="this model needs"):
        store.install(LogicalExpert(0, 1), wrong, wrong.checksum())
    replica, new = store.install(LogicalExpert(0, 1), w, w.checksum())
    assert new and replica.slot == 0
    assert store.install(LogicalExpert(0, 1), w, w.checksum()) == (replica, False)


def test_layer_stack_holds_the_weights_once(model_dir: Path) -> None:
    # After the batched path stacks a layer, the replicas are views of the stack (the
    # weights are not held twice) with the same values and checksums; a change re-stacks.
    store = ExpertStore(model_dir, num_slots=3)
    before = {}
    for e in (0, 2):
        replica, _ = store.load_from_checkpoint(LogicalExpert(0, e))
        before[e] = (replica.checksum, replica.weights.checksum())
    hidden = torch.randn(4, store.hidden_size)
    rows, experts = torch.tensor([0, 1, 2, 3]), torch.tensor([0, 2, 2, 0])
    out = store.forward_pairs(0, hidden, rows, experts, torch.ones(4))
    stack = store.layer_stack(0)
    for position, e in enumerate((0, 2)):
        replica = store.get(LogicalExpert(0, e))
        assert replica.weights.gate_up.untyped_storage().data_ptr() == (
            stack.w13.untyped_storage().data_ptr()
        )
        assert torch.equal(replica.weights.gate_up, stack.w13[position])
        assert (replica.checksum, replica.weights.checksum()) == before[e]
    for row, e in enumerate(experts.tolist()):
        want = store.get(LogicalExpert(0, e)).weights.forward(hidden[row : row + 1])
        torch.testing.assert_close(out[row : row + 1], want)
    store.load_from_checkpoint(LogicalExpert(0, 1))
    assert store.layer_stack(0) is not stack and store.layer_stack(0).w13.shape[0] == 3


# ---------------------------------------------------------------------------
# Peer-to-peer copies


def test_peer_fetch_copies_identical_replicas(
    start: Callable[..., Server], model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(service, "CHUNK_BYTES", 5000)  # several chunks per tensor
    a = start(worker_id="a")
    b = start(worker_id="b")
    src = {(i.layer, i.expert): i.checksum for i in a.load((0, 3), (1, 4)).experts}
    got = b.load((0, 3), (1, 4), peer=a).experts
    assert {(i.layer, i.expert): i.checksum for i in got} == src
    assert {(i.layer, i.expert): i.checksum for i in b.stats().experts} == src

    x = torch.randn(6, load_config(model_dir).hidden_size)
    rows = [(3, 4), (3, 2)]
    assert torch.equal(a.forward(0, rows, x), b.forward(0, rows, x))

    # Peer errors are reported as such, and nothing is installed.
    c = start(worker_id="c")
    expect_error(Code.FAILED_PRECONDITION, lambda: c.load((0, 6), peer=a), "0:6")
    closed = start(worker_id="closed")
    closed_address = closed.address
    closed.stop()
    expect_error(Code.UNAVAILABLE, lambda: c.load((0, 3), peer=closed), closed_address)
    assert c.health().num_experts == 0
    closed.stop = lambda: None  # type: ignore[method-assign]


def test_peer_copy_is_checked_against_the_controllers_checksum(
    start: Callable[..., Server],
) -> None:
    """Not against what the sender announces: a peer serving other bytes under its own
    (matching) checksum is refused, and a peer copy without a checksum is refused."""
    a = start(worker_id="a")
    b = start(worker_id="b")
    a.load((0, 1))
    refs = [expert_pb2.ExpertRef(layer=0, expert=1)]
    expect_error(
        Code.INVALID_ARGUMENT,
        lambda: b.stub.LoadExperts(
            expert_pb2.LoadExpertsRequest(experts=refs, source=a.address), timeout=30
        ),
        "checksums",
    )
    wrong = expert_pb2.LoadExpertsRequest(experts=refs, source=a.address, checksums=["0" * 64])
    expect_error(
        Code.DATA_LOSS, lambda: b.stub.LoadExperts(wrong, timeout=30), "controller recorded"
    )
    assert b.health().num_experts == 0
    assert b.load((0, 1), peer=a).experts[0].checksum == a.store.get(LogicalExpert(0, 1)).checksum


def test_peer_copy_casts_to_the_receivers_dtype(
    start: Callable[..., Server], model_dir: Path
) -> None:
    a = start(worker_id="a", dtype=torch.bfloat16)
    b = start(worker_id="b", dtype=torch.float32)
    a.load((0, 5))
    info = b.load((0, 5), peer=a).experts[0]
    bf16 = reference(model_dir, LogicalExpert(0, 5), torch.bfloat16)
    # Verified in the sender's dtype, then held (and reported) in the receiver's.
    assert info.checksum == bf16.to("cpu", torch.float32).checksum()
    assert b.store.get(LogicalExpert(0, 5)).weights.gate_up.dtype == torch.float32


def test_fetch_expert_stream(start: Callable[..., Server], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(service, "CHUNK_BYTES", 10000)
    a = start()
    info = a.load((1, 1)).experts[0]
    chunks = list(a.stub.FetchExpert(expert_pb2.ExpertRef(layer=1, expert=1), timeout=10))
    assert {c.checksum for c in chunks} == {info.checksum}
    assert all(len(c.data) <= 10000 for c in chunks)
    assert sum(len(c.data) for c in chunks) == info.nbytes
    names = [c.name for c in chunks]
    assert names == sorted(names, key=["gate_up", "down"].index) and names[-1] == "down"
    assert names[0] == "gate_up"
    expect_error(
        Code.NOT_FOUND,
        lambda: list(a.stub.FetchExpert(expert_pb2.ExpertRef(layer=1, expert=2), timeout=10)),
        "1:2",
    )


def test_corrupted_peer_is_rejected(
    start: Callable[..., Server], monkeypatch: pytest.MonkeyPatch
) -> None:
    a = start(worker_id="a")
    b = start(worker_id="b")
    a.load((0, 2), (0, 4))
    real = service.iter_expert_chunks

    def corrupt(weights: ExpertWeights, checksum: str, chunk_bytes: int) -> Iterator[Any]:
        for i, chunk in enumerate(real(weights, checksum, chunk_bytes)):
            if i == 0:
                data = bytearray(chunk.data)
                data[10] ^= 0xFF
                chunk.data = bytes(data)
            yield chunk

    monkeypatch.setattr(service, "iter_expert_chunks", corrupt)
    expect_error(Code.DATA_LOSS, lambda: b.load((0, 2), (0, 4), peer=a), "0:2", "nothing")
    assert b.health().num_experts == 0
    assert b.store.num_free_slots == 4

    # A peer that drops bytes is caught before hashing.
    def truncate(weights: ExpertWeights, checksum: str, chunk_bytes: int) -> Iterator[Any]:
        for chunk in real(weights, checksum, chunk_bytes):
            chunk.data = chunk.data[:-4]
            yield chunk

    monkeypatch.setattr(service, "iter_expert_chunks", truncate)
    expect_error(Code.DATA_LOSS, lambda: b.load((0, 4), peer=a), "incomplete")
    assert b.health().num_experts == 0


# ---------------------------------------------------------------------------
# wire


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_wire_round_trip(dtype: torch.dtype) -> None:
    t = torch.randn(3, 5).to(dtype)
    msg = tensor_to_proto(t)
    assert msg.dtype == str(dtype).removeprefix("torch.") and list(msg.shape) == [3, 5]
    back = tensor_from_proto(msg, dtype, (5,))
    assert torch.equal(back, t)
    back[0, 0] = 1  # a private copy: writing cannot touch the message
    assert torch.equal(tensor_from_proto(msg), t)
    assert torch.equal(tensor_from_proto(tensor_to_proto(t.t())), t.t())  # non-contiguous


def test_wire_errors() -> None:
    bad = expert_pb2.Tensor(dtype="float32", shape=[2, 2], data=b"\x00" * 15)
    with pytest.raises(WireError, match=r"hidden.data has 15 bytes.*needs 16"):
        tensor_from_proto(bad, what="hidden")
    with pytest.raises(WireError, match="'int4' is not supported"):
        tensor_from_proto(expert_pb2.Tensor(dtype="int4"))
    with pytest.raises(WireError, match="negative"):
        tensor_from_proto(expert_pb2.Tensor(dtype="float16", shape=[-1, 2]))
    with pytest.raises(WireError, match="60000 dimensions; at most 8"):
        tensor_from_proto(expert_pb2.Tensor(dtype="float16", shape=[3] * 60_000))
    ok = tensor_to_proto(torch.zeros(2, 4))
    with pytest.raises(WireError, match=r"must end with \[8\]"):
        tensor_from_proto(ok, expected_shape_suffix=(8,))
    with pytest.raises(WireError, match="expected 'bfloat16'"):
        tensor_from_proto(ok, expected_dtype=torch.bfloat16)


# ---------------------------------------------------------------------------
# Token frames: each token once, the worker's pairs in one batched call


def token_frame(
    layer: int, hidden: torch.Tensor, pairs: list[tuple[int, int, float]], seq: int = 0
) -> expert_pb2.TokenFrame:
    """A frame for (row, expert, weight) pairs over the rows of ``hidden``."""
    rows = torch.tensor([p[0] for p in pairs], dtype=torch.int32)
    experts = torch.tensor([p[1] for p in pairs], dtype=torch.int32)
    weights = torch.tensor([p[2] for p in pairs], dtype=hidden.dtype)
    return expert_pb2.TokenFrame(
        seq=seq,
        layer=layer,
        epoch=3,
        hidden=tensor_to_proto(hidden),
        pair_rows=rows.numpy().tobytes(),
        pair_experts=experts.numpy().tobytes(),
        pair_weights=tensor_to_proto(weights),
    )


def frame_reference(
    model_dir: Path, layer: int, hidden: torch.Tensor, pairs: list[tuple[int, int, float]]
) -> torch.Tensor:
    want = torch.zeros_like(hidden)
    for row, e, w in sorted(pairs, key=lambda p: p[1]):
        want[row] += (
            w
            * reference(model_dir, LogicalExpert(layer, e), hidden.dtype).forward(
                hidden[row : row + 1]
            )[0]
        )
    return want


FRAME_PAIRS = [(0, 5, 0.25), (0, 1, 0.75), (1, 1, 1.0), (2, 5, 0.5), (3, 1, 0.1), (3, 5, 0.9)]


def test_forward_tokens_and_stream_match_the_per_expert_reference(
    start: Callable[..., Server], model_dir: Path
) -> None:
    s = start()
    s.load((0, 1), (0, 5))
    torch.manual_seed(1)
    hidden = torch.randn(4, load_config(model_dir).hidden_size)
    want = frame_reference(model_dir, 0, hidden, FRAME_PAIRS)
    result = s.stub.ForwardTokens(token_frame(0, hidden, FRAME_PAIRS, seq=9), timeout=30)
    assert result.seq == 9 and result.code == 0
    torch.testing.assert_close(tensor_from_proto(result.output), want, rtol=1e-6, atol=1e-6)
    stats = s.stats()
    assert dict(stats.rows_per_expert) == {"0:1": 3, "0:5": 3}

    # the stream: several frames in, one result per frame out, a bad frame does not end it
    frames = [
        token_frame(0, hidden, FRAME_PAIRS, seq=1),
        token_frame(0, hidden, [(0, 2, 1.0)], seq=2),  # 0:2 is not hosted here
        token_frame(0, hidden[:1], [(3, 1, 1.0)], seq=3),  # row out of range
        token_frame(0, hidden[:2], [(1, 5, 0.5)], seq=4),
    ]
    results = list(s.stub.ForwardStream(iter(frames), timeout=30))
    assert [r.seq for r in results] == [1, 2, 3, 4]
    assert [r.code for r in results] == [
        0,
        Code.NOT_FOUND.value[0],
        Code.INVALID_ARGUMENT.value[0],
        0,
    ]
    assert "0:2" in results[1].error or "(0, 2)" in results[1].error, results[1].error
    assert "pair_rows" in results[2].error
    torch.testing.assert_close(tensor_from_proto(results[0].output), want, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(
        tensor_from_proto(results[3].output),
        frame_reference(model_dir, 0, hidden[:2], [(1, 5, 0.5)]),
        rtol=1e-6,
        atol=1e-6,
    )


def test_bad_token_frames_name_the_field(start: Callable[..., Server], model_dir: Path) -> None:
    s = start()
    s.load((0, 1))
    hidden = torch.zeros(2, load_config(model_dir).hidden_size)
    frame = token_frame(0, hidden, [(0, 1, 1.0)])
    frame.pair_rows = b"\x00\x00\x00"
    expect_error(
        Code.INVALID_ARGUMENT, lambda: s.stub.ForwardTokens(frame, timeout=10), "pair_rows"
    )
    frame = token_frame(0, hidden, [(0, 1, 1.0)])
    frame.pair_weights.CopyFrom(tensor_to_proto(torch.zeros(3)))
    expect_error(
        Code.INVALID_ARGUMENT, lambda: s.stub.ForwardTokens(frame, timeout=10), "pair_weights"
    )
    frame = token_frame(0, hidden, [(0, 99, 1.0)])
    expect_error(
        Code.INVALID_ARGUMENT, lambda: s.stub.ForwardTokens(frame, timeout=10), "pair_experts"
    )
    empty = s.stub.ForwardTokens(token_frame(0, hidden, []), timeout=10)
    assert torch.equal(tensor_from_proto(empty.output), hidden)


# ---------------------------------------------------------------------------
# The node-local data plane: the same frames over a worker's Unix socket


def node_frame(layer: int, hidden: torch.Tensor, pairs: list[tuple[int, int, float]]):
    """The router's :class:`Frame` for (row, expert, weight) pairs over ``hidden``'s rows."""
    from elasticmoe.experts.wire import host_array
    from elasticmoe.router.stream import Frame

    return Frame(
        layer=layer,
        epoch=3,
        dtype=hidden.dtype,
        hidden=host_array(hidden),
        pair_rows=np.array([p[0] for p in pairs], dtype=np.int32),
        pair_experts=np.array([p[1] for p in pairs], dtype=np.int32),
        pair_weights=host_array(torch.tensor([p[2] for p in pairs], dtype=hidden.dtype)),
    )


@pytest.fixture
def node_server(start: Callable[..., Server]) -> Iterator[Callable[..., Any]]:
    """Factory: a started server and its node-stream server (with ``token``); stopped after."""
    from elasticmoe.experts.node_stream import NodeStreamServer
    from elasticmoe.experts.rpc import RpcSecurity

    started: list[NodeStreamServer] = []

    def _start(token: str | None = "t0k3n", **kw: Any) -> tuple[Server, NodeStreamServer]:
        s = start(**kw)
        node = NodeStreamServer(s.servicer, RpcSecurity(token=token), num_threads=1)
        node.start()
        s.servicer.node_stream = node.name
        started.append(node)
        return s, node

    yield _start
    for node in started:
        node.stop()


def open_node_stream(s: Server, name: str, token: str | None = "t0k3n", worker: str = "w0"):
    from elasticmoe.router.stream import NodeStream

    return NodeStream(worker, s.address, name, token, s.store.dtype, s.store.hidden_size)


def test_node_stream_answers_frames_as_forward_stream_does(
    node_server: Callable[..., Any], model_dir: Path
) -> None:
    """Health names the socket; frames in, one result each in order, a bad frame is
    answered with its code and the stream goes on; results equal the reference."""
    s, node = node_server()
    s.load((0, 1), (0, 5))
    assert s.health().node_stream == node.name and node.name.startswith("@elasticmoe-")
    torch.manual_seed(1)
    hidden = torch.randn(4, load_config(model_dir).hidden_size)
    stream = open_node_stream(s, node.name)
    frames = [
        node_frame(0, hidden, FRAME_PAIRS),
        node_frame(0, hidden, [(0, 2, 1.0)]),  # 0:2 is not hosted here
        node_frame(0, hidden[:1], [(3, 1, 1.0)]),  # row out of range
        node_frame(0, hidden[:2], [(1, 5, 0.5)]),
    ]
    tickets = [stream.submit(f) for f in frames]
    assert stream.num_in_flight == 4
    results = [stream.result(t, timeout=30) for t in tickets]
    assert [r.code for r in results] == [
        0,
        Code.NOT_FOUND.value[0],
        Code.INVALID_ARGUMENT.value[0],
        0,
    ]
    assert "0:2" in results[1].error or "(0, 2)" in results[1].error, results[1].error
    assert "pair_rows" in results[2].error
    want = frame_reference(model_dir, 0, hidden, FRAME_PAIRS)
    torch.testing.assert_close(results[0].output, want, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(
        results[3].output,
        frame_reference(model_dir, 0, hidden[:2], [(1, 5, 0.5)]),
        rtol=1e-6,
        atol=1e-6,
    )
    assert results[0].compute_seconds > 0 and not stream.broken
    assert dict(s.stats().rows_per_expert) == {"0:1": 3, "0:5": 4}
    stream.close()


def test_node_stream_refuses_a_wrong_token_or_worker(node_server: Callable[..., Any]) -> None:
    from elasticmoe.router.stream import NodeRefusedError

    s, node = node_server()
    with pytest.raises(NodeRefusedError, match="deployment token"):
        open_node_stream(s, node.name, token="wrong")
    with pytest.raises(NodeRefusedError, match="deployment token"):
        open_node_stream(s, node.name, token=None)
    with pytest.raises(NodeRefusedError, match="serves worker 'w0', not 'w9'"):
        open_node_stream(s, node.name, worker="w9")
    with pytest.raises(NodeRefusedError, match="elasticmoe-nothing-here"):
        open_node_stream(s, "@elasticmoe-nothing-here")
    # none of that took the server down
    open_node_stream(s, node.name).close()
    wait_for(lambda: node.num_connections == 0)


def wait_for(condition: Callable[[], bool], timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not met"
        time.sleep(0.01)


def test_node_stream_bad_frames_name_the_field_and_garbage_ends_the_connection(
    node_server: Callable[..., Any], model_dir: Path
) -> None:
    import socket as socketlib

    from elasticmoe.experts.node_stream import FRAME, RESULT, socket_address

    s, node = node_server()
    s.load((0, 1))
    size = load_config(model_dir).hidden_size
    stream = open_node_stream(s, node.name)
    # a frame whose hidden size or dtype is not the worker's: answered, the stream goes on
    wrong_size = node_frame(0, torch.zeros(2, size + 1), [(0, 1, 1.0)])
    wrong_dtype = node_frame(0, torch.zeros(2, size, dtype=torch.bfloat16), [(0, 1, 1.0)])
    ok = node_frame(0, torch.ones(2, size), [(1, 1, 1.0)])
    results = [stream.result(stream.submit(f), 30) for f in (wrong_size, wrong_dtype, ok)]
    assert [r.code for r in results] == [Code.INVALID_ARGUMENT.value[0]] * 2 + [0]
    assert "hidden_size" in results[0].error and "dtype" in results[1].error
    assert results[2].output.shape == (2, size)

    # bytes that are not a frame header end that connection only
    raw = socketlib.socket(socketlib.AF_UNIX, socketlib.SOCK_STREAM)
    raw.settimeout(30)
    raw.connect(socket_address(node.name))
    from elasticmoe.experts.node_stream import HELLO, HELLO_MAGIC

    raw.sendall(HELLO.pack(HELLO_MAGIC, 5, 2) + b"t0k3nw0")
    assert raw.recv(64)[:4] == b"EMA1"
    raw.sendall(b"x" * FRAME.size)
    assert raw.recv(RESULT.size) == b""  # closed, nothing answered
    raw.close()
    # nor can a frame whose dtype code is unknown (its body's length depends on it)
    raw = socketlib.socket(socketlib.AF_UNIX, socketlib.SOCK_STREAM)
    raw.settimeout(30)
    raw.connect(socket_address(node.name))
    raw.sendall(HELLO.pack(HELLO_MAGIC, 5, 2) + b"t0k3nw0")
    assert raw.recv(64)[:4] == b"EMA1"
    raw.sendall(FRAME.pack(b"EMF1", 1, 0, 0, 1, 1, size, 9))
    assert raw.recv(RESULT.size) == b""
    raw.close()
    again = stream.result(stream.submit(ok), 30)
    assert again.code == 0 and torch.equal(again.output, results[2].output)
    stream.close()


def test_node_stream_large_frames_in_flight_both_ways_do_not_deadlock(
    node_server: Callable[..., Any], model_dir: Path
) -> None:
    """Two frames and their results each far larger than a socket's buffer, both frames
    written before either result is read (two micro-batches): the router reads results
    while its writes wait, so neither side blocks for good."""
    s, node = node_server()
    s.load((0, 1))
    size = load_config(model_dir).hidden_size
    rows = (4 << 20) // (4 * size)  # 4 MiB of hidden rows each way per frame
    stream = open_node_stream(s, node.name)
    torch.manual_seed(0)
    hidden = torch.randn(rows, size)
    pairs = [(r, 1, 1.0) for r in range(rows)]
    tickets = [stream.submit(node_frame(0, hidden, pairs)) for _ in range(2)]
    a, b = (stream.result(t, timeout=120) for t in tickets)
    assert a.code == b.code == 0 and torch.equal(a.output, b.output)
    torch.testing.assert_close(
        a.output[:3], frame_reference(model_dir, 0, hidden[:3], pairs[:3]), rtol=1e-6, atol=1e-6
    )
    stream.close()


def test_stopping_ends_idle_node_streams_and_refuses_new_ones(
    node_server: Callable[..., Any], model_dir: Path
) -> None:
    from elasticmoe.router.stream import NodeRefusedError, StreamBrokenError

    s, node = node_server()
    s.load((0, 1))
    stream = open_node_stream(s, node.name)
    wait_for(lambda: node.num_connections == 1)
    node.stop()
    wait_for(lambda: node.num_connections == 0)
    size = load_config(model_dir).hidden_size
    ticket = stream.submit(node_frame(0, torch.ones(1, size), [(0, 1, 1.0)]))
    with pytest.raises(StreamBrokenError, match="node stream to w0 broke"):
        stream.result(ticket, timeout=30)
    assert stream.broken
    with pytest.raises(NodeRefusedError):
        open_node_stream(s, node.name)


def test_the_router_takes_node_streams_where_offered_and_grpc_otherwise(
    node_server: Callable[..., Any], start: Callable[..., Server], model_dir: Path
) -> None:
    """w0 offers a node stream, w1 (no node-stream server) does not: the router opens one
    of each, and its output is the per-expert reference. Once w0's socket is gone (the
    name its Health gives cannot be reached), the next stream to w0 is gRPC, and a
    router told ``node_streams=False`` never opens one."""
    from elasticmoe.core.expert_map import ExpertMap
    from elasticmoe.model.gate import GateOutput
    from elasticmoe.router.router import ExpertRouter, RouterConfig
    from elasticmoe.router.stream import NodeStream, WorkerStream

    w0, node = node_server(token=None, worker_id="w0")
    w1 = start(worker_id="w1")
    w0.load((0, 1))
    w1.load((0, 5))
    placement = {LogicalExpert(0, 1): ("w0",), LogicalExpert(0, 5): ("w1",)}
    expert_map = ExpertMap(1, placement, {"w0": w0.address, "w1": w1.address})
    size = load_config(model_dir).hidden_size
    torch.manual_seed(2)
    hidden = torch.randn(4, size)
    indices = torch.tensor([[1, 5], [5, 1], [1, 5], [5, 1]])
    weights = torch.tensor([[0.75, 0.25], [0.5, 0.5], [0.1, 0.9], [1.0, 0.0]])
    gate = GateOutput(weights, indices, torch.bincount(indices.flatten(), minlength=8))
    pairs = [
        (t, int(e), float(w)) for t in range(4) for e, w in zip(indices[t], weights[t], strict=True)
    ]
    want = frame_reference(model_dir, 0, hidden, pairs)

    def run(config: RouterConfig) -> tuple[torch.Tensor, dict[str, type]]:
        router = ExpertRouter(expert_map, torch.float32, size, config)
        try:
            router.begin_step()
            out = router.forward(0, hidden, gate)
            router.end_step()
            return out, {w: type(s) for w, s in router._streams.items()}
        finally:
            router.close()

    out, kinds = run(RouterConfig())
    assert kinds == {"w0": NodeStream, "w1": WorkerStream}
    torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-5)
    out, kinds = run(RouterConfig(node_streams=False))
    assert kinds == {"w0": WorkerStream, "w1": WorkerStream}
    torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-5)
    node.stop()
    out, kinds = run(RouterConfig())
    assert kinds == {"w0": WorkerStream, "w1": WorkerStream}
    torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-5)


def test_a_node_stream_result_with_the_wrong_rows_is_data_loss_not_a_crash(
    model_dir: Path,
) -> None:
    """A peer on the socket that answers a 2-row frame with 1 row: the router gets a
    DATA_LOSS result naming both counts (and would retry elsewhere), not a shape error
    later in the layer's combine."""
    import socket as socketlib

    from elasticmoe.experts.node_stream import (
        FRAME,
        HELLO,
        RESULT,
        WELCOME,
        frame_body_bytes,
        recv_exact,
        socket_address,
    )

    size = load_config(model_dir).hidden_size
    name = "@elasticmoe-test-wrong-rows"
    listener = socketlib.socket(socketlib.AF_UNIX, socketlib.SOCK_STREAM)
    listener.bind(socket_address(name))
    listener.listen(1)

    def lying_worker() -> None:
        conn, _ = listener.accept()
        with conn:
            head = bytearray(HELLO.size)
            recv_exact(conn, memoryview(head))
            _, token_len, id_len = HELLO.unpack(head)
            recv_exact(conn, memoryview(bytearray(token_len + id_len)))
            conn.sendall(WELCOME.pack(b"EMA1", 1, 2) + b"w0")
            header = bytearray(FRAME.size)
            recv_exact(conn, memoryview(header))
            _, seq, _, _, rows, pairs, hidden, _ = FRAME.unpack(header)
            recv_exact(conn, memoryview(bytearray(frame_body_bytes(rows, pairs, hidden, 4))))
            out = bytes(4 * hidden)  # one row, not two
            conn.sendall(RESULT.pack(b"EMR1", seq, 0, 0.0, 1, len(out)) + out)
            conn.recv(1)  # until the router closes

    thread = threading.Thread(target=lying_worker, daemon=True)
    thread.start()
    from elasticmoe.router.stream import NodeStream

    stream = NodeStream("w0", "x", name, None, torch.float32, size)
    result = stream.result(stream.submit(node_frame(0, torch.ones(2, size), [(1, 1, 1.0)])), 30)
    assert result.code == Code.DATA_LOSS.value[0] and result.output is None
    assert "sent 2 rows" in result.error and "has 1 rows" in result.error
    stream.close()
    thread.join(30)
    listener.close()
    assert not thread.is_alive()
