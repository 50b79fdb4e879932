from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Tensor(_message.Message):
    __slots__ = ("dtype", "shape", "data")
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    dtype: str
    shape: _containers.RepeatedScalarFieldContainer[int]
    data: bytes
    def __init__(self, dtype: _Optional[str] = ..., shape: _Optional[_Iterable[int]] = ..., data: _Optional[bytes] = ...) -> None: ...

class ExpertRows(_message.Message):
    __slots__ = ("expert", "num_rows")
    EXPERT_FIELD_NUMBER: _ClassVar[int]
    NUM_ROWS_FIELD_NUMBER: _ClassVar[int]
    expert: int
    num_rows: int
    def __init__(self, expert: _Optional[int] = ..., num_rows: _Optional[int] = ...) -> None: ...

class ForwardRequest(_message.Message):
    __slots__ = ("layer", "experts", "hidden", "epoch")
    LAYER_FIELD_NUMBER: _ClassVar[int]
    EXPERTS_FIELD_NUMBER: _ClassVar[int]
    HIDDEN_FIELD_NUMBER: _ClassVar[int]
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    layer: int
    experts: _containers.RepeatedCompositeFieldContainer[ExpertRows]
    hidden: Tensor
    epoch: int
    def __init__(self, layer: _Optional[int] = ..., experts: _Optional[_Iterable[_Union[ExpertRows, _Mapping]]] = ..., hidden: _Optional[_Union[Tensor, _Mapping]] = ..., epoch: _Optional[int] = ...) -> None: ...

class ForwardResponse(_message.Message):
    __slots__ = ("output",)
    OUTPUT_FIELD_NUMBER: _ClassVar[int]
    output: Tensor
    def __init__(self, output: _Optional[_Union[Tensor, _Mapping]] = ...) -> None: ...

class TokenFrame(_message.Message):
    __slots__ = ("seq", "layer", "epoch", "hidden", "pair_rows", "pair_experts", "pair_weights")
    SEQ_FIELD_NUMBER: _ClassVar[int]
    LAYER_FIELD_NUMBER: _ClassVar[int]
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    HIDDEN_FIELD_NUMBER: _ClassVar[int]
    PAIR_ROWS_FIELD_NUMBER: _ClassVar[int]
    PAIR_EXPERTS_FIELD_NUMBER: _ClassVar[int]
    PAIR_WEIGHTS_FIELD_NUMBER: _ClassVar[int]
    seq: int
    layer: int
    epoch: int
    hidden: Tensor
    pair_rows: bytes
    pair_experts: bytes
    pair_weights: Tensor
    def __init__(self, seq: _Optional[int] = ..., layer: _Optional[int] = ..., epoch: _Optional[int] = ..., hidden: _Optional[_Union[Tensor, _Mapping]] = ..., pair_rows: _Optional[bytes] = ..., pair_experts: _Optional[bytes] = ..., pair_weights: _Optional[_Union[Tensor, _Mapping]] = ...) -> None: ...

class TokenResult(_message.Message):
    __slots__ = ("seq", "output", "code", "error", "compute_seconds")
    SEQ_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_FIELD_NUMBER: _ClassVar[int]
    CODE_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    COMPUTE_SECONDS_FIELD_NUMBER: _ClassVar[int]
    seq: int
    output: Tensor
    code: int
    error: str
    compute_seconds: float
    def __init__(self, seq: _Optional[int] = ..., output: _Optional[_Union[Tensor, _Mapping]] = ..., code: _Optional[int] = ..., error: _Optional[str] = ..., compute_seconds: _Optional[float] = ...) -> None: ...

class ExpertRef(_message.Message):
    __slots__ = ("layer", "expert")
    LAYER_FIELD_NUMBER: _ClassVar[int]
    EXPERT_FIELD_NUMBER: _ClassVar[int]
    layer: int
    expert: int
    def __init__(self, layer: _Optional[int] = ..., expert: _Optional[int] = ...) -> None: ...

class ExpertInfo(_message.Message):
    __slots__ = ("layer", "expert", "checksum", "nbytes")
    LAYER_FIELD_NUMBER: _ClassVar[int]
    EXPERT_FIELD_NUMBER: _ClassVar[int]
    CHECKSUM_FIELD_NUMBER: _ClassVar[int]
    NBYTES_FIELD_NUMBER: _ClassVar[int]
    layer: int
    expert: int
    checksum: str
    nbytes: int
    def __init__(self, layer: _Optional[int] = ..., expert: _Optional[int] = ..., checksum: _Optional[str] = ..., nbytes: _Optional[int] = ...) -> None: ...

class LoadExpertsRequest(_message.Message):
    __slots__ = ("experts", "source", "checksums")
    EXPERTS_FIELD_NUMBER: _ClassVar[int]
    SOURCE_FIELD_NUMBER: _ClassVar[int]
    CHECKSUMS_FIELD_NUMBER: _ClassVar[int]
    experts: _containers.RepeatedCompositeFieldContainer[ExpertRef]
    source: str
    checksums: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, experts: _Optional[_Iterable[_Union[ExpertRef, _Mapping]]] = ..., source: _Optional[str] = ..., checksums: _Optional[_Iterable[str]] = ...) -> None: ...

class LoadExpertsResponse(_message.Message):
    __slots__ = ("experts",)
    EXPERTS_FIELD_NUMBER: _ClassVar[int]
    experts: _containers.RepeatedCompositeFieldContainer[ExpertInfo]
    def __init__(self, experts: _Optional[_Iterable[_Union[ExpertInfo, _Mapping]]] = ...) -> None: ...

class UnloadExpertsRequest(_message.Message):
    __slots__ = ("experts",)
    EXPERTS_FIELD_NUMBER: _ClassVar[int]
    experts: _containers.RepeatedCompositeFieldContainer[ExpertRef]
    def __init__(self, experts: _Optional[_Iterable[_Union[ExpertRef, _Mapping]]] = ...) -> None: ...

class UnloadExpertsResponse(_message.Message):
    __slots__ = ("num_unloaded",)
    NUM_UNLOADED_FIELD_NUMBER: _ClassVar[int]
    num_unloaded: int
    def __init__(self, num_unloaded: _Optional[int] = ...) -> None: ...

class ExpertChunk(_message.Message):
    __slots__ = ("name", "dtype", "shape", "offset", "data", "checksum")
    NAME_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    CHECKSUM_FIELD_NUMBER: _ClassVar[int]
    name: str
    dtype: str
    shape: _containers.RepeatedScalarFieldContainer[int]
    offset: int
    data: bytes
    checksum: str
    def __init__(self, name: _Optional[str] = ..., dtype: _Optional[str] = ..., shape: _Optional[_Iterable[int]] = ..., offset: _Optional[int] = ..., data: _Optional[bytes] = ..., checksum: _Optional[str] = ...) -> None: ...

class HealthRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class HealthResponse(_message.Message):
    __slots__ = ("status", "worker_id", "num_experts", "node_stream")
    STATUS_FIELD_NUMBER: _ClassVar[int]
    WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    NUM_EXPERTS_FIELD_NUMBER: _ClassVar[int]
    NODE_STREAM_FIELD_NUMBER: _ClassVar[int]
    status: str
    worker_id: str
    num_experts: int
    node_stream: str
    def __init__(self, status: _Optional[str] = ..., worker_id: _Optional[str] = ..., num_experts: _Optional[int] = ..., node_stream: _Optional[str] = ...) -> None: ...

class StatsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class StatsResponse(_message.Message):
    __slots__ = ("worker_id", "experts", "num_slots", "forward_calls", "rows_served", "compute_seconds", "rows_per_expert")
    class RowsPerExpertEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: int
        def __init__(self, key: _Optional[str] = ..., value: _Optional[int] = ...) -> None: ...
    WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    EXPERTS_FIELD_NUMBER: _ClassVar[int]
    NUM_SLOTS_FIELD_NUMBER: _ClassVar[int]
    FORWARD_CALLS_FIELD_NUMBER: _ClassVar[int]
    ROWS_SERVED_FIELD_NUMBER: _ClassVar[int]
    COMPUTE_SECONDS_FIELD_NUMBER: _ClassVar[int]
    ROWS_PER_EXPERT_FIELD_NUMBER: _ClassVar[int]
    worker_id: str
    experts: _containers.RepeatedCompositeFieldContainer[ExpertInfo]
    num_slots: int
    forward_calls: int
    rows_served: int
    compute_seconds: float
    rows_per_expert: _containers.ScalarMap[str, int]
    def __init__(self, worker_id: _Optional[str] = ..., experts: _Optional[_Iterable[_Union[ExpertInfo, _Mapping]]] = ..., num_slots: _Optional[int] = ..., forward_calls: _Optional[int] = ..., rows_served: _Optional[int] = ..., compute_seconds: _Optional[float] = ..., rows_per_expert: _Optional[_Mapping[str, int]] = ...) -> None: ...
