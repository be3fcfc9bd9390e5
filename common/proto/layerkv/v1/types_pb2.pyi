from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from typing import ClassVar as _ClassVar, Iterable as _Iterable, Optional as _Optional

DESCRIPTOR: _descriptor.FileDescriptor

class FinishReason(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    FINISH_REASON_UNSPECIFIED: _ClassVar[FinishReason]
    FINISH_REASON_STOP: _ClassVar[FinishReason]
    FINISH_REASON_LENGTH: _ClassVar[FinishReason]
    FINISH_REASON_ABORT: _ClassVar[FinishReason]
    FINISH_REASON_ERROR: _ClassVar[FinishReason]
FINISH_REASON_UNSPECIFIED: FinishReason
FINISH_REASON_STOP: FinishReason
FINISH_REASON_LENGTH: FinishReason
FINISH_REASON_ABORT: FinishReason
FINISH_REASON_ERROR: FinishReason

class SamplingParams(_message.Message):
    __slots__ = ("max_tokens", "temperature", "top_p", "top_k", "seed", "stop_token_ids", "ignore_eos")
    MAX_TOKENS_FIELD_NUMBER: _ClassVar[int]
    TEMPERATURE_FIELD_NUMBER: _ClassVar[int]
    TOP_P_FIELD_NUMBER: _ClassVar[int]
    TOP_K_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    STOP_TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    IGNORE_EOS_FIELD_NUMBER: _ClassVar[int]
    max_tokens: int
    temperature: float
    top_p: float
    top_k: int
    seed: int
    stop_token_ids: _containers.RepeatedScalarFieldContainer[int]
    ignore_eos: bool
    def __init__(self, max_tokens: _Optional[int] = ..., temperature: _Optional[float] = ..., top_p: _Optional[float] = ..., top_k: _Optional[int] = ..., seed: _Optional[int] = ..., stop_token_ids: _Optional[_Iterable[int]] = ..., ignore_eos: bool = ...) -> None: ...

class Slo(_message.Message):
    __slots__ = ("ttft_s", "tpot_s")
    TTFT_S_FIELD_NUMBER: _ClassVar[int]
    TPOT_S_FIELD_NUMBER: _ClassVar[int]
    ttft_s: float
    tpot_s: float
    def __init__(self, ttft_s: _Optional[float] = ..., tpot_s: _Optional[float] = ...) -> None: ...

class KvGeometry(_message.Message):
    __slots__ = ("num_layers", "num_kv_heads", "head_dim", "block_size", "dtype_bytes")
    NUM_LAYERS_FIELD_NUMBER: _ClassVar[int]
    NUM_KV_HEADS_FIELD_NUMBER: _ClassVar[int]
    HEAD_DIM_FIELD_NUMBER: _ClassVar[int]
    BLOCK_SIZE_FIELD_NUMBER: _ClassVar[int]
    DTYPE_BYTES_FIELD_NUMBER: _ClassVar[int]
    num_layers: int
    num_kv_heads: int
    head_dim: int
    block_size: int
    dtype_bytes: int
    def __init__(self, num_layers: _Optional[int] = ..., num_kv_heads: _Optional[int] = ..., head_dim: _Optional[int] = ..., block_size: _Optional[int] = ..., dtype_bytes: _Optional[int] = ...) -> None: ...

class CostModel(_message.Message):
    __slots__ = ("d2h_bytes_per_s", "h2d_bytes_per_s", "prefill_base_s", "prefill_per_token_s", "prefill_per_token2_s", "decode_base_s", "decode_per_request_s", "decode_per_context_token_s", "correction", "host_in_place")
    D2H_BYTES_PER_S_FIELD_NUMBER: _ClassVar[int]
    H2D_BYTES_PER_S_FIELD_NUMBER: _ClassVar[int]
    PREFILL_BASE_S_FIELD_NUMBER: _ClassVar[int]
    PREFILL_PER_TOKEN_S_FIELD_NUMBER: _ClassVar[int]
    PREFILL_PER_TOKEN2_S_FIELD_NUMBER: _ClassVar[int]
    DECODE_BASE_S_FIELD_NUMBER: _ClassVar[int]
    DECODE_PER_REQUEST_S_FIELD_NUMBER: _ClassVar[int]
    DECODE_PER_CONTEXT_TOKEN_S_FIELD_NUMBER: _ClassVar[int]
    CORRECTION_FIELD_NUMBER: _ClassVar[int]
    HOST_IN_PLACE_FIELD_NUMBER: _ClassVar[int]
    d2h_bytes_per_s: float
    h2d_bytes_per_s: float
    prefill_base_s: float
    prefill_per_token_s: float
    prefill_per_token2_s: float
    decode_base_s: float
    decode_per_request_s: float
    decode_per_context_token_s: float
    correction: float
    host_in_place: bool
    def __init__(self, d2h_bytes_per_s: _Optional[float] = ..., h2d_bytes_per_s: _Optional[float] = ..., prefill_base_s: _Optional[float] = ..., prefill_per_token_s: _Optional[float] = ..., prefill_per_token2_s: _Optional[float] = ..., decode_base_s: _Optional[float] = ..., decode_per_request_s: _Optional[float] = ..., decode_per_context_token_s: _Optional[float] = ..., correction: _Optional[float] = ..., host_in_place: bool = ...) -> None: ...

class ProfileInfo(_message.Message):
    __slots__ = ("source", "duration_s", "measured_unix_s")
    SOURCE_FIELD_NUMBER: _ClassVar[int]
    DURATION_S_FIELD_NUMBER: _ClassVar[int]
    MEASURED_UNIX_S_FIELD_NUMBER: _ClassVar[int]
    source: str
    duration_s: float
    measured_unix_s: float
    def __init__(self, source: _Optional[str] = ..., duration_s: _Optional[float] = ..., measured_unix_s: _Optional[float] = ...) -> None: ...

class TierUsage(_message.Message):
    __slots__ = ("total_blocks", "free_blocks", "used_blocks_per_layer")
    TOTAL_BLOCKS_FIELD_NUMBER: _ClassVar[int]
    FREE_BLOCKS_FIELD_NUMBER: _ClassVar[int]
    USED_BLOCKS_PER_LAYER_FIELD_NUMBER: _ClassVar[int]
    total_blocks: int
    free_blocks: int
    used_blocks_per_layer: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, total_blocks: _Optional[int] = ..., free_blocks: _Optional[int] = ..., used_blocks_per_layer: _Optional[_Iterable[int]] = ...) -> None: ...
