"""The expert service of one worker: its slots (:class:`ExpertStore`) and gRPC servicer.

The store holds replicas of logical experts in a fixed number of slots and
knows how to fill a slot from the checkpoint or from bytes copied off a peer
(verified against the peer's checksum before anything is installed). The
servicer exposes the store over ``elasticmoe.v1.ExpertService`` with grpc.aio;
torch work runs in worker threads so the event loop keeps answering health
checks while experts compute or load.

Errors map to gRPC status codes the router and controller act on:
NOT_FOUND (expert not hosted / not in the model: refresh the expert map, try
another replica), INVALID_ARGUMENT (malformed request: a bug in the caller),
RESOURCE_EXHAUSTED (no free slot), DATA_LOSS (a peer sent bytes that do not
match its checksum), FAILED_PRECONDITION (the peer refused or serves another
model), UNAVAILABLE (the peer could not be reached).
"""

from __future__ import annotations

import asyncio
import functools
import logging
import math
import threading
import time
import weakref
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, TypeVar

import grpc
import torch

from elasticmoe._proto.elasticmoe.v1 import expert_pb2, expert_pb2_grpc
from elasticmoe.core.experts import LogicalExpert
from elasticmoe.experts.priority import BackgroundPriority, lower_current_thread
from elasticmoe.experts.rpc import (
    GRPC_OPTIONS,
    RpcSecurity,
    TokenServerInterceptor,
    open_aio_channel,
    server_credentials,
)
from elasticmoe.experts.weights import (
    TENSOR_NAMES,
    ExpertWeights,
    expert_tensor_shapes,
    load_expert_weights,
)
from elasticmoe.experts.wire import (
    WireError,
    bytes_to_tensor,
    dtype_from_name,
    dtype_from_name_for,
    dtype_name,
    tensor_from_proto,
    tensor_to_bytes,
    tensor_to_proto,
)
from elasticmoe.model.checkpoint import CheckpointError, CheckpointReader
from elasticmoe.model.config import MoEModelConfig, load_config
from elasticmoe.model.kernels import PackedExperts, cpu_ops, pack_experts, widen_experts
from elasticmoe.model.moe import fused_expert_pairs

__all__ = [
    "CHUNK_BYTES",
    "ChecksumMismatchError",
    "CorruptCopyError",
    "ExpertNotFoundError",
    "ExpertServicer",
    "ExpertStore",
    "ExpertStoreError",
    "IncompatibleExpertError",
    "InvalidRequestError",
    "PeerError",
    "Replica",
    "StoreFullError",
    "StoreStats",
    "add_servicer_to_server",
    "fetch_expert",
    "format_address",
    "iter_expert_chunks",
    "serve",
]

logger = logging.getLogger(__name__)

# RPCs one worker runs at once; more get RESOURCE_EXHAUSTED (the router retries them on
# another replica) instead of queueing without bound. Engines x in-flight layers stays
# far below this.
MAX_CONCURRENT_RPCS = 256
CHUNK_BYTES = 1 << 20  # FetchExpert payload per message
# A TokenFrame with at most this many (token, expert) pairs computes on the event loop.
INLINE_MAX_PAIRS = 512
# Every tensor name a FetchExpert chunk may carry; which of them one expert has follows
# from the model (ExpertStore.weight_shapes: biases only for gpt_oss).
WEIGHT_NAMES = TENSOR_NAMES
SERVICE_NAME = "elasticmoe.v1.ExpertService"
SERVING = "SERVING"
NOT_SERVING = "NOT_SERVING"

T = TypeVar("T")


# ---------------------------------------------------------------------------
# Errors (each maps to one gRPC status code, see _STATUS_OF)


class ExpertStoreError(Exception):
    """Base class of the errors the store and servicer report to callers."""


class ExpertNotFoundError(ExpertStoreError, LookupError):
    """A logical expert is not hosted here, or does not exist in the model."""


class StoreFullError(ExpertStoreError):
    """No free slot is left for another replica."""


class CorruptCopyError(ExpertStoreError):
    """Weights copied from a peer are corrupt or incomplete; nothing was installed."""


class ChecksumMismatchError(CorruptCopyError):
    """Copied weights do not hash to the checksum their sender announced."""


class IncompatibleExpertError(ExpertStoreError):
    """Copied weights have shapes of a different model."""


class InvalidRequestError(ExpertStoreError):
    """A request is malformed (counts, tensor, source address)."""


class PeerError(ExpertStoreError):
    """A peer worker failed to send an expert; ``code`` is the status to report."""

    def __init__(self, message: str, code: grpc.StatusCode) -> None:
        super().__init__(message)
        self.code = code


_STATUS_OF: tuple[tuple[type[BaseException], grpc.StatusCode], ...] = (
    (ExpertNotFoundError, grpc.StatusCode.NOT_FOUND),
    (StoreFullError, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (CorruptCopyError, grpc.StatusCode.DATA_LOSS),
    (IncompatibleExpertError, grpc.StatusCode.FAILED_PRECONDITION),
    (InvalidRequestError, grpc.StatusCode.INVALID_ARGUMENT),
    (WireError, grpc.StatusCode.INVALID_ARGUMENT),
    (CheckpointError, grpc.StatusCode.INTERNAL),
)


def _status_of(exc: BaseException) -> grpc.StatusCode:
    if isinstance(exc, PeerError):
        return exc.code
    for cls, code in _STATUS_OF:
        if isinstance(exc, cls):
            return code
    return grpc.StatusCode.INTERNAL


# ---------------------------------------------------------------------------
# The store


@dataclass(frozen=True)
class Replica:
    """One logical expert's weights in one slot of this worker."""

    expert: LogicalExpert
    slot: int
    weights: ExpertWeights
    checksum: str
    nbytes: int


@dataclass
class StoreStats:
    """Serving counters since the store was created."""

    forward_calls: int = 0
    rows_served: int = 0
    compute_seconds: float = 0.0
    rows_per_expert: dict[LogicalExpert, int] = field(default_factory=dict)


@dataclass(frozen=True)
class LayerStack:
    """One layer's held experts stacked: ``w13`` [S, 2I, H], ``w2`` [S, H, I] (on CPU as
    transposed views of row-major buffers, as :class:`LocalExperts` keeps them), their
    biases ``b13`` [S, 2I] / ``b2`` [S, H] where the model has them (gpt_oss), and
    ``index`` [num_experts]: the stack position of each logical expert, -1 if not held, and
    ``packed``: the same weights packed for the CPU kernel where it applies."""

    index: torch.Tensor
    w13: torch.Tensor | None
    w2: torch.Tensor | None
    b13: torch.Tensor | None = None
    b2: torch.Tensor | None = None
    packed: PackedExperts | None = None

    @classmethod
    def of(
        cls,
        experts: Sequence[int],
        weights: Sequence[ExpertWeights],
        num_experts: int,
        device: torch.device,
    ) -> LayerStack:
        index = torch.full((num_experts,), -1, dtype=torch.long, device=device)
        if not experts:
            return cls(index, None, None)
        index[torch.tensor(list(experts), device=device)] = torch.arange(
            len(experts), device=device
        )
        w13 = torch.stack([w.gate_up for w in weights])
        w2 = torch.stack([w.down for w in weights])
        if w13.device.type == "cpu":
            w13 = w13.transpose(1, 2).contiguous().transpose(1, 2)
            w2 = w2.transpose(1, 2).contiguous().transpose(1, 2)
        biased = weights[0].gate_up_bias is not None
        b13 = torch.stack([w.gate_up_bias for w in weights]) if biased else None
        b2 = torch.stack([w.down_bias for w in weights]) if biased else None
        packed = pack_experts(w13, w2, b13, b2, weights[0].activation.name) or widen_experts(
            w13, w2
        )
        return cls(index, w13, w2, b13, b2, packed)

    def weights_of(self, position: int, like: ExpertWeights) -> ExpertWeights:
        """The expert at ``position`` as views into the stack (same values as ``like``)."""
        assert self.w13 is not None and self.w2 is not None
        return ExpertWeights(
            self.w13[position],
            self.w2[position],
            None if self.b13 is None else self.b13[position],
            None if self.b2 is None else self.b2[position],
            like.activation,
        )


class ExpertStore:
    """The slots of one worker: up to ``num_slots`` replicas of logical experts.

    Mutations (load, install, unload) are serialised by a lock and may run in
    any thread; lookups (:meth:`get`) take no lock, so the compute path never
    waits behind a slow load. A replica unloaded while a forward pass uses it
    stays alive until that pass ends (the pass holds a reference).
    """

    def __init__(
        self,
        model_dir: Path | str,
        num_slots: int,
        dtype: torch.dtype | str = torch.float32,
        device: torch.device | str = "cpu",
        worker_id: str = "worker",
        config: MoEModelConfig | None = None,
    ) -> None:
        if num_slots < 1:
            raise ValueError(f"num_slots={num_slots} must be >= 1")
        self.model_dir = Path(model_dir)
        self.config = config if config is not None else load_config(self.model_dir)
        self.dtype = dtype_from_name(dtype) if isinstance(dtype, str) else dtype
        dtype_name(self.dtype)  # fail now, not on the first request, if it cannot be sent
        self.device = torch.device(device)
        self.activation = self.config.expert_activation
        self.worker_id = worker_id
        self._slots: list[Replica | None] = [None] * num_slots
        self._replicas: dict[LogicalExpert, Replica] = {}
        self._lock = threading.Lock()
        self._stats_lock = threading.Lock()
        # Opened on first use: a worker filled only from peers never reads the checkpoint.
        self._reader: CheckpointReader | None = None
        self.stats = StoreStats()
        # layer -> its held experts stacked for one batched call; dropped on load/unload
        self._stacks: dict[int, LayerStack] = {}
        if self.device.type == "cpu" and self.dtype == torch.bfloat16:
            cpu_ops()  # the CPU kernel's one-time build now, not inside the first forward

    # -- queries ----------------------------------------------------------

    @property
    def num_slots(self) -> int:
        """Capacity in replicas."""
        return len(self._slots)

    @property
    def num_free_slots(self) -> int:
        """Slots not holding a replica."""
        return self.num_slots - len(self._replicas)

    @property
    def hidden_size(self) -> int:
        """H, the width of the rows experts take and return."""
        return self.config.hidden_size

    def weight_shapes(self) -> dict[str, tuple[int, ...]]:
        """Shape of each weight tensor of an expert of this model, by wire name."""
        return expert_tensor_shapes(self.config)

    def get(self, expert: LogicalExpert) -> Replica | None:
        """The replica of ``expert`` held here, if any."""
        return self._replicas.get(expert)

    def replicas(self) -> list[Replica]:
        """Held replicas in slot order."""
        return [r for r in list(self._slots) if r is not None]

    def slots(self) -> list[Replica | None]:
        """Every slot, ``None`` where free."""
        return list(self._slots)

    def check_exists(self, expert: LogicalExpert) -> None:
        """Raise :class:`ExpertNotFoundError` unless ``expert`` is an expert of the model."""
        cfg = self.config
        if not cfg.is_moe_layer(expert.layer):
            raise ExpertNotFoundError(
                f"expert {expert} does not exist: layer {expert.layer} is not an MoE layer "
                f"(MoE layers: {_format_ints(cfg.moe_layers)})"
            )
        if not 0 <= expert.expert < cfg.num_experts:
            raise ExpertNotFoundError(
                f"expert {expert} does not exist: experts are 0..{cfg.num_experts - 1}"
            )

    def not_hosted_error(
        self, expert: LogicalExpert, epoch: int | None = None
    ) -> ExpertNotFoundError:
        """The error for a request naming an expert this worker does not hold."""
        try:
            self.check_exists(expert)
            reason = f"hosted here: {_format_experts(self._replicas)}"
        except ExpertNotFoundError as e:
            reason = str(e)
        at_epoch = "" if epoch is None else f", request epoch {epoch}"
        return ExpertNotFoundError(
            f"expert {expert} is not hosted on worker {self.worker_id!r} ({reason}{at_epoch})"
        )

    # -- mutations --------------------------------------------------------

    def load_from_checkpoint(self, expert: LogicalExpert) -> tuple[Replica, bool]:
        """Fill a free slot with ``expert`` read from the checkpoint; a no-op if held.

        Returns the replica and whether this call filled a slot for it.
        """
        self.check_exists(expert)
        with self._lock:
            existing = self._replicas.get(expert)
            if existing is not None:
                return existing, False
            self._check_free(1)
            if self._reader is None:
                self._reader = CheckpointReader(self.model_dir)
            weights = load_expert_weights(
                self._reader, self.config, expert, self.dtype, self.device
            )
            return self._place(expert, weights, weights.checksum()), True

    def install(
        self, expert: LogicalExpert, weights: ExpertWeights, expected_checksum: str
    ) -> tuple[Replica, bool]:
        """Fill a free slot with copied ``weights`` after checking them; a no-op if held.

        ``expected_checksum`` is the checksum the controller recorded for this
        expert (never the one the sender announces); nothing is installed when
        the copied bytes hash to anything else. The
        weights are then cast to this store's dtype and device. Returns the
        replica and whether this call filled a slot for it.
        """
        self.check_exists(expert)
        want = self.weight_shapes()
        got = {name: tuple(t.shape) for name, t in weights.tensors().items()}
        if got != want:
            raise IncompatibleExpertError(
                f"expert {expert}: copied weights have shapes {got}; this model needs {want}"
            )
        actual = weights.checksum()
        if actual != expected_checksum:
            raise ChecksumMismatchError(
                f"expert {expert}: copied weights hash to {actual}, the controller recorded "
                f"{expected_checksum}; nothing was installed"
            )
        existing = self.get(expert)
        if existing is not None:
            return existing, False
        # The activation is this model's (from the config), never the sender's.
        local = replace(weights.to(self.device, self.dtype), activation=self.activation)
        # A cast changes the bytes, so the replica's checksum is of what is held here.
        checksum = actual if local.gate_up.dtype == weights.gate_up.dtype else local.checksum()
        with self._lock:
            existing = self._replicas.get(expert)
            if existing is not None:
                return existing, False
            self._check_free(1)
            return self._place(expert, local, checksum), True

    def unload(self, expert: LogicalExpert) -> bool:
        """Free the slot of ``expert``; False if it was not held."""
        with self._lock:
            replica = self._replicas.pop(expert, None)
            if replica is None:
                return False
            self._slots[replica.slot] = None
            self._stacks.pop(expert.layer, None)
            return True

    def _check_free(self, needed: int) -> None:
        if needed > self.num_free_slots:
            raise StoreFullError(
                f"worker {self.worker_id!r} has {self.num_free_slots} free slot(s) of "
                f"{self.num_slots} but needs {needed}; unload experts first or use another worker"
            )

    def _place(self, expert: LogicalExpert, weights: ExpertWeights, checksum: str) -> Replica:
        slot = self._slots.index(None)  # lowest free slot: placements stay compact
        replica = Replica(expert, slot, weights, checksum, weights.nbytes())
        self._slots[slot] = replica
        self._replicas[expert] = replica
        self._stacks.pop(expert.layer, None)
        return replica

    # -- compute ----------------------------------------------------------

    def forward(
        self, weights: Sequence[ExpertWeights], counts: Sequence[int], hidden: torch.Tensor
    ) -> torch.Tensor:
        """Run ``weights[i]`` on the next ``counts[i]`` rows of ``hidden`` ([N, H]) -> [N, H]."""
        out = torch.empty_like(hidden)
        start = 0
        with torch.inference_mode():
            for w, n in zip(weights, counts, strict=True):
                if n:
                    out[start : start + n] = w.forward(hidden[start : start + n])
                start += n
        return out

    def layer_stack(self, layer: int) -> LayerStack:
        """The experts of ``layer`` held here, stacked (built on first use after a change).

        Building it copies the layer's replicas into the stack once; the replicas are then
        re-pointed at views of the stack (same values, same checksums), so the weights are
        held once. The previous stack's memory goes when no replica or in-flight forward
        pass refers to it any more (a change re-stacks only its own layer).
        """
        stack = self._stacks.get(layer)
        if stack is not None:
            return stack
        with self._lock:
            stack = self._stacks.get(layer)
            if stack is None:
                held = sorted(
                    (r for r in self._replicas.values() if r.expert.layer == layer),
                    key=lambda r: r.expert.expert,
                )
                stack = self._stacks[layer] = LayerStack.of(
                    [r.expert.expert for r in held],
                    [r.weights for r in held],
                    self.config.num_experts,
                    self.device,
                )
                for position, r in enumerate(held):
                    viewed = replace(r, weights=stack.weights_of(position, r.weights))
                    self._slots[r.slot] = viewed
                    self._replicas[r.expert] = viewed
        return stack

    def forward_pairs(
        self,
        layer: int,
        hidden: torch.Tensor,
        pair_rows: torch.Tensor,
        pair_experts: torch.Tensor,
        pair_weights: torch.Tensor,
        epoch: int | None = None,
    ) -> torch.Tensor:
        """Per token row of ``hidden``, the weighted sum of its (row, expert, weight) pairs.

        One batched call over the layer's stacked experts (:func:`fused_expert_pairs`);
        raises :class:`ExpertNotFoundError` for a pair naming an expert not held here.
        """
        for name, values, bound in (
            ("pair_rows", pair_rows, hidden.shape[0]),
            ("pair_experts", pair_experts, self.config.num_experts),
        ):
            if values.numel():
                lo, hi = values.aminmax()
                if int(lo) < 0 or int(hi) >= bound:
                    raise InvalidRequestError(f"{name} must be in 0..{bound - 1}")
        stack = self.layer_stack(layer)
        local = stack.index[pair_experts.long()]
        if pair_experts.numel() and int(local.min()) < 0:
            missing = int(pair_experts[local < 0][0])
            raise self.not_hosted_error(LogicalExpert(layer, missing), epoch)
        if stack.w13 is None:  # nothing held in this layer and no pairs
            return torch.zeros_like(hidden)
        with torch.inference_mode():
            return fused_expert_pairs(
                hidden,
                pair_rows.long(),
                local,
                pair_weights,
                stack.w13,
                stack.w2,
                stack.b13,
                stack.b2,
                self.activation,
                stack.packed,
            )

    def record_forward(
        self, layer: int, experts: Sequence[int], counts: Sequence[int], seconds: float
    ) -> None:
        """Add one Forward call to the serving counters."""
        with self._stats_lock:
            s = self.stats
            s.forward_calls += 1
            s.rows_served += sum(counts)
            s.compute_seconds += seconds
            for e, n in zip(experts, counts, strict=True):
                key = LogicalExpert(layer, e)
                s.rows_per_expert[key] = s.rows_per_expert.get(key, 0) + n

    def stats_snapshot(self) -> StoreStats:
        """A consistent copy of the serving counters."""
        with self._stats_lock:
            s = self.stats
            return StoreStats(
                s.forward_calls, s.rows_served, s.compute_seconds, dict(s.rows_per_expert)
            )

    def info(self) -> list[expert_pb2.ExpertInfo]:
        """ExpertInfo of every held replica, in slot order."""
        return [_info(r) for r in self.replicas()]


def _decode_hidden(store: ExpertStore, proto: Any) -> torch.Tensor:
    """A request's token rows [rows, H] in the store's dtype and device (read-only view)."""
    hidden = tensor_from_proto(
        proto,
        expected_dtype=store.dtype,
        expected_shape_suffix=(store.hidden_size,),
        device=store.device,
        readonly_ok=True,  # the experts only read their input
        what="hidden",
    )
    if hidden.dim() != 2:
        raise InvalidRequestError(
            f"hidden.shape {list(hidden.shape)} must be [rows, {store.hidden_size}]"
        )
    return hidden


def _info(replica: Replica) -> expert_pb2.ExpertInfo:
    return expert_pb2.ExpertInfo(
        layer=replica.expert.layer,
        expert=replica.expert.expert,
        checksum=replica.checksum,
        nbytes=replica.nbytes,
    )


def _format_ints(values: Sequence[int]) -> str:
    return ", ".join(str(v) for v in values) or "none"


def _int32_count(data: bytes, what: str) -> int:
    """How many int32 values ``data`` holds; its length must be a multiple of 4."""
    if len(data) % 4:
        raise InvalidRequestError(f"{what} has {len(data)} bytes, not a whole number of int32")
    return len(data) // 4


def _format_experts(experts: Any, limit: int = 16) -> str:
    names = [str(e) for e in sorted(list(experts))]  # list(): snapshot a live dict
    if not names:
        return "none"
    more = f" and {len(names) - limit} more" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more


# ---------------------------------------------------------------------------
# Peer-to-peer copy


def iter_expert_chunks(
    weights: ExpertWeights, checksum: str, chunk_bytes: int = CHUNK_BYTES
) -> Iterator[expert_pb2.ExpertChunk]:
    """The FetchExpert stream of one replica: each weight tensor in chunks of raw bytes.

    Every tensor yields at least one chunk (an empty tensor still announces its
    shape), and every chunk carries the checksum of the whole expert.
    """
    for name, tensor in weights.tensors().items():
        raw = memoryview(tensor_to_bytes(tensor))
        header = {"name": name, "dtype": dtype_name(tensor.dtype), "shape": list(tensor.shape)}
        offset = 0
        while True:
            piece = raw[offset : offset + chunk_bytes]
            yield expert_pb2.ExpertChunk(
                **header, offset=offset, data=bytes(piece), checksum=checksum
            )
            offset += len(piece)
            if offset >= len(raw):
                break


@dataclass
class _Assembly:
    """One weight tensor being reassembled from chunks."""

    dtype: torch.dtype
    shape: tuple[int, ...]
    buffer: bytearray
    received: int = 0


async def fetch_expert(
    stub: expert_pb2_grpc.ExpertServiceStub,
    expert: LogicalExpert,
    peer: str,
    timeout: float | None = None,
    expected_shapes: Mapping[str, tuple[int, ...]] | None = None,
) -> tuple[ExpertWeights, str]:
    """Copy one expert off a peer: its weights (CPU, the peer's dtype) and claimed checksum.

    The stream is checked for consistency (names, dtypes, shapes, offsets,
    one checksum, every byte present); the checksum itself is verified by
    :meth:`ExpertStore.install`. With ``expected_shapes`` (see
    :meth:`ExpertStore.weight_shapes`) a peer of another model is refused
    before any buffer is allocated for its claimed shapes, and every tensor it names
    (biases too, where the model has them) must arrive. The weights come back with the
    default activation; :meth:`ExpertStore.install` sets the model's.
    """
    required = tuple(expected_shapes) if expected_shapes is not None else ("gate_up", "down")
    parts: dict[str, _Assembly] = {}
    claimed: str | None = None
    where = f"peer {peer} sending expert {expert}"
    try:
        call = stub.FetchExpert(
            expert_pb2.ExpertRef(layer=expert.layer, expert=expert.expert), timeout=timeout
        )
        async for chunk in call:
            if chunk.name not in WEIGHT_NAMES:
                raise CorruptCopyError(f"{where}: unknown tensor name {chunk.name!r}")
            if claimed is None:
                claimed = chunk.checksum
            elif chunk.checksum != claimed:
                raise CorruptCopyError(f"{where}: the checksum changed mid-stream")
            part = parts.get(chunk.name)
            shape = tuple(chunk.shape)
            if part is None:
                try:
                    dtype = dtype_from_name_for(chunk.dtype, f"{chunk.name}")
                except WireError as e:
                    raise CorruptCopyError(f"{where}: {e}") from None
                if any(d < 0 for d in shape):
                    raise CorruptCopyError(f"{where}: {chunk.name} has shape {list(shape)}")
                if expected_shapes is not None and chunk.name not in expected_shapes:
                    raise IncompatibleExpertError(
                        f"{where}: sent {chunk.name}, which experts of this model do not have "
                        "(is the peer serving another model?)"
                    )
                if expected_shapes is not None and shape != tuple(expected_shapes[chunk.name]):
                    raise IncompatibleExpertError(
                        f"{where}: {chunk.name} has shape {list(shape)}, this model needs "
                        f"{list(expected_shapes[chunk.name])} (is the peer serving another model?)"
                    )
                size = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
                part = parts[chunk.name] = _Assembly(dtype, shape, bytearray(size))
            elif shape != part.shape or dtype_from_name(chunk.dtype) != part.dtype:
                raise CorruptCopyError(f"{where}: {chunk.name} changed dtype/shape")
            data = chunk.data
            end = chunk.offset + len(data)
            if chunk.offset < 0 or end > len(part.buffer):
                raise CorruptCopyError(
                    f"{where}: {chunk.name} chunk [{chunk.offset}, {end}) is outside "
                    f"its {len(part.buffer)} bytes"
                )
            part.buffer[chunk.offset : end] = data
            part.received += len(data)
    except grpc.aio.AioRpcError as e:
        code = e.code()
        if code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
            status = grpc.StatusCode.UNAVAILABLE
        else:
            status = grpc.StatusCode.FAILED_PRECONDITION
        raise PeerError(f"{where}: {code.name}: {e.details()}", status) from None
    for name in (*required, *(n for n in parts if n not in required)):
        part = parts.get(name)
        if part is None or part.received != len(part.buffer):
            got = 0 if part is None else part.received
            want = "?" if part is None else len(part.buffer)
            raise CorruptCopyError(f"{where}: incomplete {name} ({got} of {want} bytes)")
    tensors = {
        # bytearray is writable, so frombuffer views it without another copy.
        name: bytes_to_tensor(parts[name].buffer, parts[name].dtype, parts[name].shape)
        for name in parts
    }
    assert claimed is not None  # at least one chunk was seen (the required parts exist)
    return ExpertWeights.from_tensors(tensors), claimed


def _parse_source(source: str) -> str | None:
    """None for the checkpoint, else the peer address; rejects malformed addresses."""
    if source in ("", "checkpoint"):
        return None
    host, sep, port = source.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise InvalidRequestError(
            f"source {source!r} must be '' or 'checkpoint', or a peer address 'host:port'"
        )
    return source


# ---------------------------------------------------------------------------
# The servicer


@dataclass(frozen=True)
class _Undecodable:
    """Stands in for a request whose bytes did not parse (see :func:`_tolerant`)."""

    type_name: str
    error: str

    def message(self) -> str:
        return f"request is not a valid {self.type_name}: {self.error}"


def _tolerant(deserialize: Callable[[bytes], Any], type_name: str) -> Callable[[bytes], Any]:
    """A deserializer that hands undecodable bytes to the handler instead of raising.

    grpc.aio answers a deserializer exception with UNKNOWN; the handler turns
    the stand-in into INVALID_ARGUMENT, which tells the caller it sent garbage.
    """

    def parse(data: bytes) -> Any:
        try:
            return deserialize(data)
        except Exception as e:
            return _Undecodable(type_name, f"{type(e).__name__}: {e}")

    return parse


def _rpc(
    method: Callable[[ExpertServicer, Any, grpc.aio.ServicerContext], Awaitable[T]],
) -> Callable[[ExpertServicer, Any, grpc.aio.ServicerContext], Awaitable[T]]:
    """Turn the store's errors into gRPC status codes (and log unexpected ones)."""

    @functools.wraps(method)
    async def wrapper(self: ExpertServicer, request: Any, context: grpc.aio.ServicerContext) -> T:
        if isinstance(request, _Undecodable):
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, request.message())
        try:
            return await method(self, request, context)
        except (ExpertStoreError, WireError, CheckpointError) as e:
            await context.abort(_status_of(e), str(e))
        except Exception as e:
            logger.exception("worker %s: %s failed", self.store.worker_id, method.__name__)
            await context.abort(grpc.StatusCode.INTERNAL, f"{type(e).__name__}: {e}")
        raise AssertionError("unreachable: context.abort raises")

    return wrapper


class ExpertServicer(expert_pb2_grpc.ExpertServiceServicer):
    """``elasticmoe.v1.ExpertService`` over one :class:`ExpertStore`, for grpc.aio.

    Forward passes run one at a time on a dedicated compute thread (running
    several would only oversubscribe the cores torch already uses); loads and
    peer transfers run on a separate thread so they never stall forwards.
    """

    def __init__(
        self,
        store: ExpertStore,
        num_threads: int | None = None,
        background_priority: BackgroundPriority = "idle",
    ) -> None:
        self.store = store
        self.status = SERVING
        # torch.set_num_threads only affects the calling thread under OpenMP,
        # so each executor thread sets it for itself.
        init = (lambda: torch.set_num_threads(num_threads)) if num_threads else None
        self._compute = ThreadPoolExecutor(1, "expert-compute", initializer=init)
        # Loads and peer copies are background work: their thread runs below the compute
        # thread (see elasticmoe.experts.priority) with one torch thread, so a replica
        # load or a copy sent to a peer never takes cores from Forward calls.
        self._io = ThreadPoolExecutor(
            1, "expert-io", initializer=_background_thread, initargs=(background_priority,)
        )
        self._num_threads = num_threads
        self._loop_threads = threading.local()  # whether torch's threads are set there
        self._stream_tasks: dict[asyncio.Task, bool] = {}  # ForwardStream handler -> idle
        # the name of the worker's node-local data plane, once it has one (Health tells it)
        self.node_stream = ""
        # Executors of a servicer nobody closed still end their threads once it is collected.
        self._finalizer = weakref.finalize(self, _shutdown, self._compute, self._io)

    def close(self) -> None:
        """Stop the worker threads (pending work is cancelled)."""
        self.status = NOT_SERVING
        self._finalizer()

    async def _run(self, executor: ThreadPoolExecutor, fn: Callable[..., T], *args: Any) -> T:
        return await asyncio.get_running_loop().run_in_executor(executor, fn, *args)

    # -- data plane -------------------------------------------------------

    @_rpc
    async def Forward(
        self, request: expert_pb2.ForwardRequest, context: grpc.aio.ServicerContext
    ) -> expert_pb2.ForwardResponse:
        """Run each listed expert on its rows; rows keep their order."""
        return await self._run(self._compute, self._forward_sync, request)

    def _forward_sync(self, request: expert_pb2.ForwardRequest) -> expert_pb2.ForwardResponse:
        store = self.store
        experts = [e.expert for e in request.experts]
        counts = [e.num_rows for e in request.experts]
        for i, n in enumerate(counts):
            if n < 0:
                raise InvalidRequestError(f"experts[{i}].num_rows={n} is negative")
        # Resolve the replicas before decoding: a stale expert map is the common
        # failure and should not cost a host-to-device copy of the batch.
        weights = []
        for e in experts:
            replica = store.get(LogicalExpert(request.layer, e))
            if replica is None:
                raise store.not_hosted_error(LogicalExpert(request.layer, e), request.epoch)
            weights.append(replica.weights)
        hidden = _decode_hidden(store, request.hidden)
        num_rows = hidden.shape[0]
        if not experts and num_rows:
            raise InvalidRequestError(f"experts is empty but hidden has {num_rows} rows")
        if sum(counts) != num_rows:
            raise InvalidRequestError(
                f"experts[].num_rows sum to {sum(counts)} but hidden has {num_rows} rows"
            )
        start = time.perf_counter()
        out = store.forward(weights, counts, hidden)
        if out.device.type == "cuda":
            torch.cuda.synchronize(out.device)  # count the kernels, not just their launch
        store.record_forward(request.layer, experts, counts, time.perf_counter() - start)
        return expert_pb2.ForwardResponse(output=tensor_to_proto(out))

    @_rpc
    async def ForwardTokens(
        self, request: expert_pb2.TokenFrame, context: grpc.aio.ServicerContext
    ) -> expert_pb2.TokenResult:
        """One frame: each token once, its pairs here computed in one batched call."""
        return await self._frame(request)

    async def ForwardStream(
        self, request_iterator: AsyncIterator[Any], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[expert_pb2.TokenResult]:
        """One TokenResult per TokenFrame, in order; a failed frame answers with its
        status code and message and the stream goes on."""
        task = asyncio.current_task()
        self._stream_tasks[task] = True  # idle: waiting for a frame
        try:
            async for frame in request_iterator:
                self._stream_tasks[task] = False
                yield await self._stream_result(frame)
                if self.status != SERVING:  # stopping: end after the frame in flight
                    return
                self._stream_tasks[task] = True
        finally:
            self._stream_tasks.pop(task, None)

    def end_idle_streams(self) -> None:
        """End the ForwardStreams waiting for a frame (a stopping worker: the routers see the
        stream end and use other replicas); busy ones end after their frame."""
        for task, idle in list(self._stream_tasks.items()):
            if idle:
                task.cancel()

    async def _stream_result(self, frame: Any) -> expert_pb2.TokenResult:
        """One frame's TokenResult; a failure is reported in it, never raised."""
        if isinstance(frame, _Undecodable):
            return expert_pb2.TokenResult(
                code=grpc.StatusCode.INVALID_ARGUMENT.value[0], error=frame.message()
            )
        try:
            return await self._frame(frame)
        except Exception as e:
            code, error = self.frame_failure(e)
            return expert_pb2.TokenResult(seq=frame.seq, code=code, error=error)

    def frame_failure(self, e: Exception) -> tuple[int, str]:
        """A failed frame's status code and message (unexpected errors are logged)."""
        if isinstance(e, (ExpertStoreError, WireError, CheckpointError)):
            return _status_of(e).value[0], str(e)
        logger.exception("worker %s: frame failed", self.store.worker_id, exc_info=e)
        return grpc.StatusCode.INTERNAL.value[0], f"{type(e).__name__}: {e}"

    async def _frame(self, frame: expert_pb2.TokenFrame) -> expert_pb2.TokenResult:
        # Small frames (decode batches) run right here on the event loop: the hop to the
        # compute thread and back costs more than they do. Large ones go to the thread so
        # health checks stay answered while they compute.
        if len(frame.pair_experts) <= 4 * INLINE_MAX_PAIRS:
            if not getattr(self._loop_threads, "set", False):
                if self._num_threads:
                    torch.set_num_threads(self._num_threads)
                self._loop_threads.set = True
            return self._frame_sync(frame)
        return await self._run(self._compute, self._frame_sync, frame)

    def _frame_sync(self, frame: expert_pb2.TokenFrame) -> expert_pb2.TokenResult:
        store = self.store
        hidden = _decode_hidden(store, frame.hidden)
        num_pairs = _int32_count(frame.pair_experts, "pair_experts")
        if _int32_count(frame.pair_rows, "pair_rows") != num_pairs:
            raise InvalidRequestError(
                f"pair_rows has {len(frame.pair_rows) // 4} entries, pair_experts {num_pairs}"
            )
        rows = bytes_to_tensor(frame.pair_rows, torch.int32, (num_pairs,), readonly_ok=True)
        experts = bytes_to_tensor(frame.pair_experts, torch.int32, (num_pairs,), readonly_ok=True)
        weights = tensor_from_proto(
            frame.pair_weights,
            expected_dtype=store.dtype,
            device=store.device,
            readonly_ok=True,
            what="pair_weights",
        )
        if tuple(weights.shape) != (num_pairs,):
            raise InvalidRequestError(
                f"pair_weights.shape {list(weights.shape)} must be [{num_pairs}] (one per pair)"
            )
        out, seconds = self.forward_frame(frame.layer, frame.epoch, hidden, rows, experts, weights)
        return expert_pb2.TokenResult(
            seq=frame.seq, output=tensor_to_proto(out), compute_seconds=seconds
        )

    def forward_frame(
        self,
        layer: int,
        epoch: int,
        hidden: torch.Tensor,
        pair_rows: torch.Tensor,
        pair_experts: torch.Tensor,
        pair_weights: torch.Tensor,
    ) -> tuple[torch.Tensor, float]:
        """One decoded frame (either transport): the weighted sums per token row and the
        seconds its compute took; the counters are updated. ``hidden`` and ``pair_weights``
        are on the store's device; the int32 pair indices may be on the host."""
        store = self.store
        start = time.perf_counter()
        if store.device.type != "cpu":
            pair_rows, pair_experts = pair_rows.to(store.device), pair_experts.to(store.device)
        out = store.forward_pairs(layer, hidden, pair_rows, pair_experts, pair_weights, epoch)
        if out.device.type == "cuda":
            torch.cuda.synchronize(out.device)  # count the kernels, not just their launch
        seconds = time.perf_counter() - start
        ids, counts = torch.unique(pair_experts, return_counts=True)
        store.record_forward(layer, ids.tolist(), counts.tolist(), seconds)
        return out, seconds

    # -- control plane ----------------------------------------------------

    async def load_experts(
        self,
        experts: Sequence[LogicalExpert],
        source: str = "",
        timeout: float | None = None,
        checksums: Sequence[str] = (),
    ) -> list[Replica]:
        """Fill free slots with ``experts`` from the checkpoint or a peer; all or nothing.

        ``source`` is "" / "checkpoint" or a peer's "host:port". A peer copy needs
        ``checksums``, one per expert, as the controller recorded them: the copy is
        verified against those, not against what the peer claims. Experts already
        held are no-ops. Raises :class:`StoreFullError` before loading anything
        when the new ones do not fit, and unloads what this call loaded when a
        later expert fails, so a retry starts from the same slots.
        """
        store = self.store
        peer = _parse_source(source)
        if peer is not None and len(checksums) != len(experts):
            raise InvalidRequestError(
                f"checksums: a copy from peer {peer} needs the controller's checksum of each "
                f"of the {len(experts)} expert(s); got {len(checksums)}"
            )
        expected = dict(zip(experts, checksums, strict=False))
        wanted = list(dict.fromkeys(experts))
        for expert in wanted:
            store.check_exists(expert)
        missing = [e for e in wanted if store.get(e) is None]
        if len(missing) > store.num_free_slots:
            raise StoreFullError(
                f"worker {store.worker_id!r} has {store.num_free_slots} free slot(s) of "
                f"{store.num_slots}, cannot load {len(missing)} expert(s) "
                f"({_format_experts(missing)}); unload experts first or use another worker"
            )
        filled: list[LogicalExpert] = []
        try:
            if peer is None:
                for expert in missing:
                    _, new = await self._run(self._io, store.load_from_checkpoint, expert)
                    if new:
                        filled.append(expert)
            else:
                async with open_aio_channel(peer) as channel:
                    stub = expert_pb2_grpc.ExpertServiceStub(channel)
                    for expert in missing:
                        weights, _claimed = await fetch_expert(
                            stub, expert, peer, timeout, store.weight_shapes()
                        )
                        _, new = await self._run(
                            self._io, store.install, expert, weights, expected[expert]
                        )
                        if new:
                            filled.append(expert)
        except BaseException:
            # Only what this call filled: a concurrent load of the same expert keeps its slot.
            for expert in filled:
                store.unload(expert)
            raise
        replicas = []
        for expert in wanted:
            replica = store.get(expert)
            if replica is None:  # unloaded concurrently; report rather than lie
                raise store.not_hosted_error(expert)
            replicas.append(replica)
        return replicas

    @_rpc
    async def LoadExperts(
        self, request: expert_pb2.LoadExpertsRequest, context: grpc.aio.ServicerContext
    ) -> expert_pb2.LoadExpertsResponse:
        """Fill free slots from the checkpoint or a peer; all or nothing."""
        replicas = await self.load_experts(
            [LogicalExpert(r.layer, r.expert) for r in request.experts],
            request.source,
            # grpc does not propagate deadlines: pass the caller's on to the peer.
            timeout=context.time_remaining(),
            checksums=list(request.checksums),
        )
        return expert_pb2.LoadExpertsResponse(experts=[_info(r) for r in replicas])

    @_rpc
    async def UnloadExperts(
        self, request: expert_pb2.UnloadExpertsRequest, context: grpc.aio.ServicerContext
    ) -> expert_pb2.UnloadExpertsResponse:
        """Free the slots of the listed experts; absent ones are skipped."""
        wanted = dict.fromkeys(LogicalExpert(r.layer, r.expert) for r in request.experts)
        num = sum(self.store.unload(e) for e in wanted)
        return expert_pb2.UnloadExpertsResponse(num_unloaded=num)

    async def FetchExpert(
        self, request: expert_pb2.ExpertRef, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[expert_pb2.ExpertChunk]:
        """Stream one hosted expert's weights to a peer."""
        if isinstance(request, _Undecodable):
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, request.message())
        expert = LogicalExpert(request.layer, request.expert)
        replica = self.store.get(expert)
        if replica is None:
            await context.abort(grpc.StatusCode.NOT_FOUND, str(self.store.not_hosted_error(expert)))
            return
        # Chunks are produced on the io thread (device-to-host copies, memcpy) one
        # at a time, so the loop stays free and memory holds one chunk in flight.
        chunks = iter_expert_chunks(replica.weights, replica.checksum, CHUNK_BYTES)
        while True:
            chunk = await self._run(self._io, next, chunks, None)
            if chunk is None:
                break
            yield chunk

    @_rpc
    async def Health(
        self, request: expert_pb2.HealthRequest, context: grpc.aio.ServicerContext
    ) -> expert_pb2.HealthResponse:
        """Answered on the event loop, never behind compute."""
        return expert_pb2.HealthResponse(
            status=self.status,
            worker_id=self.store.worker_id,
            num_experts=len(self.store.replicas()),
            node_stream=self.node_stream,
        )

    @_rpc
    async def Stats(
        self, request: expert_pb2.StatsRequest, context: grpc.aio.ServicerContext
    ) -> expert_pb2.StatsResponse:
        """Replicas held and serving counters since start."""
        store = self.store
        s = store.stats_snapshot()
        return expert_pb2.StatsResponse(
            worker_id=store.worker_id,
            experts=store.info(),
            num_slots=store.num_slots,
            forward_calls=s.forward_calls,
            rows_served=s.rows_served,
            compute_seconds=s.compute_seconds,
            rows_per_expert={str(k): v for k, v in s.rows_per_expert.items()},
        )


class _HandlerCapture:
    """Collects the method handlers the generated ``add_*_to_server`` registers."""

    def __init__(self) -> None:
        self.handlers: dict[str, grpc.RpcMethodHandler] = {}

    def add_generic_rpc_handlers(self, handlers: Any) -> None:
        pass

    def add_registered_method_handlers(self, service: str, handlers: dict[str, Any]) -> None:
        self.handlers = dict(handlers)


def add_servicer_to_server(servicer: ExpertServicer, server: grpc.aio.Server) -> None:
    """Register ``servicer`` like the generated code does, with tolerant deserializers."""
    # Reusing the generated handler table keeps method names and message types in
    # step with the proto; only the request deserializers are swapped.
    capture = _HandlerCapture()
    expert_pb2_grpc.add_ExpertServiceServicer_to_server(servicer, capture)
    if not capture.handlers:
        raise RuntimeError("generated add_ExpertServiceServicer_to_server registered no methods")
    handlers = {
        name: handler._replace(  # type: ignore[attr-defined]
            request_deserializer=_tolerant(handler.request_deserializer, _request_type(name))
        )
        for name, handler in capture.handlers.items()
    }
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE_NAME, handlers),))
    server.add_registered_method_handlers(SERVICE_NAME, handlers)


def _request_type(method: str) -> str:
    return (
        expert_pb2.DESCRIPTOR.services_by_name["ExpertService"]
        .methods_by_name[method]
        .input_type.full_name
    )


def _background_thread(level: BackgroundPriority) -> None:
    """Initializer of the loader thread: one torch thread, below serving's priority."""
    torch.set_num_threads(1)
    lower_current_thread(level)


def _shutdown(*executors: ThreadPoolExecutor) -> None:
    for executor in executors:
        executor.shutdown(wait=False, cancel_futures=True)


def format_address(host: str, port: int) -> str:
    """``host:port``, bracketing IPv6 literals."""
    return f"[{host}]:{port}" if ":" in host and not host.startswith("[") else f"{host}:{port}"


async def serve(
    store: ExpertStore,
    host: str = "127.0.0.1",
    port: int = 0,
    *,
    servicer: ExpertServicer | None = None,
    interceptors: Sequence[grpc.aio.ServerInterceptor] = (),
    security: RpcSecurity | None = None,
) -> tuple[grpc.aio.Server, int]:
    """Start a grpc.aio server for ``store`` on ``host:port`` (0: any free port).

    ``security`` (default: this process's environment, see :mod:`elasticmoe.experts.rpc`)
    makes every call present the deployment's token and, with a certificate, serves TLS.
    Must be awaited on the event loop the server will live on. Returns the
    started server and the bound port; stop it with ``await server.stop(grace)``
    (and ``servicer.close()`` if you passed one).
    """
    sec = security or RpcSecurity.from_env()
    guards = [TokenServerInterceptor(sec)] if sec.token else []
    server = grpc.aio.server(
        options=GRPC_OPTIONS,
        interceptors=[*guards, *interceptors],
        maximum_concurrent_rpcs=MAX_CONCURRENT_RPCS,
    )
    add_servicer_to_server(servicer or ExpertServicer(store), server)
    address = format_address(host, port)
    credentials = server_credentials(sec)
    bound = (
        server.add_secure_port(address, credentials)
        if credentials is not None
        else server.add_insecure_port(address)
    )
    if bound == 0:
        raise OSError(f"worker {store.worker_id!r}: cannot bind gRPC server to {address}")
    await server.start()
    return server, bound
