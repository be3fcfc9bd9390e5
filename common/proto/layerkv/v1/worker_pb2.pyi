from common.proto.layerkv.v1 import types_pb2 as _types_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from typing import ClassVar as _ClassVar, Iterable as _Iterable, Mapping as _Mapping, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class DispatchStatus(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    DISPATCH_STATUS_UNSPECIFIED: _ClassVar[DispatchStatus]
    DISPATCH_STATUS_ACCEPTED: _ClassVar[DispatchStatus]
    DISPATCH_STATUS_REFUSED: _ClassVar[DispatchStatus]
    DISPATCH_STATUS_REJECTED: _ClassVar[DispatchStatus]
    DISPATCH_STATUS_FAILED: _ClassVar[DispatchStatus]
DISPATCH_STATUS_UNSPECIFIED: DispatchStatus
DISPATCH_STATUS_ACCEPTED: DispatchStatus
DISPATCH_STATUS_REFUSED: DispatchStatus
DISPATCH_STATUS_REJECTED: DispatchStatus
DISPATCH_STATUS_FAILED: DispatchStatus

class DescribeRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class DescribeResponse(_message.Message):
    __slots__ = ("worker_id", "model", "geometry", "gpu_blocks", "host_blocks", "cost_model", "max_model_len", "eos_token_id", "device", "dtype", "staging_blocks", "preemption_mode", "max_num_batched_tokens", "vocab_size", "profile")
    WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    GEOMETRY_FIELD_NUMBER: _ClassVar[int]
    GPU_BLOCKS_FIELD_NUMBER: _ClassVar[int]
    HOST_BLOCKS_FIELD_NUMBER: _ClassVar[int]
    COST_MODEL_FIELD_NUMBER: _ClassVar[int]
    MAX_MODEL_LEN_FIELD_NUMBER: _ClassVar[int]
    EOS_TOKEN_ID_FIELD_NUMBER: _ClassVar[int]
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    STAGING_BLOCKS_FIELD_NUMBER: _ClassVar[int]
    PREEMPTION_MODE_FIELD_NUMBER: _ClassVar[int]
    MAX_NUM_BATCHED_TOKENS_FIELD_NUMBER: _ClassVar[int]
    VOCAB_SIZE_FIELD_NUMBER: _ClassVar[int]
    PROFILE_FIELD_NUMBER: _ClassVar[int]
    worker_id: str
    model: str
    geometry: _types_pb2.KvGeometry
    gpu_blocks: int
    host_blocks: int
    cost_model: _types_pb2.CostModel
    max_model_len: int
    eos_token_id: int
    device: str
    dtype: str
    staging_blocks: int
    preemption_mode: str
    max_num_batched_tokens: int
    vocab_size: int
    profile: _types_pb2.ProfileInfo
    def __init__(self, worker_id: _Optional[str] = ..., model: _Optional[str] = ..., geometry: _Optional[_Union[_types_pb2.KvGeometry, _Mapping]] = ..., gpu_blocks: _Optional[int] = ..., host_blocks: _Optional[int] = ..., cost_model: _Optional[_Union[_types_pb2.CostModel, _Mapping]] = ..., max_model_len: _Optional[int] = ..., eos_token_id: _Optional[int] = ..., device: _Optional[str] = ..., dtype: _Optional[str] = ..., staging_blocks: _Optional[int] = ..., preemption_mode: _Optional[str] = ..., max_num_batched_tokens: _Optional[int] = ..., vocab_size: _Optional[int] = ..., profile: _Optional[_Union[_types_pb2.ProfileInfo, _Mapping]] = ...) -> None: ...

class GetTokenizerRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class GetTokenizerResponse(_message.Message):
    __slots__ = ("kind", "tokenizer_json", "chat_template", "bos_token", "eos_token")
    KIND_FIELD_NUMBER: _ClassVar[int]
    TOKENIZER_JSON_FIELD_NUMBER: _ClassVar[int]
    CHAT_TEMPLATE_FIELD_NUMBER: _ClassVar[int]
    BOS_TOKEN_FIELD_NUMBER: _ClassVar[int]
    EOS_TOKEN_FIELD_NUMBER: _ClassVar[int]
    kind: str
    tokenizer_json: bytes
    chat_template: str
    bos_token: str
    eos_token: str
    def __init__(self, kind: _Optional[str] = ..., tokenizer_json: _Optional[bytes] = ..., chat_template: _Optional[str] = ..., bos_token: _Optional[str] = ..., eos_token: _Optional[str] = ...) -> None: ...

class DispatchRequest(_message.Message):
    __slots__ = ("request_id", "prompt_token_ids", "sampling", "placement", "preemption")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    PROMPT_TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    SAMPLING_FIELD_NUMBER: _ClassVar[int]
    PLACEMENT_FIELD_NUMBER: _ClassVar[int]
    PREEMPTION_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    prompt_token_ids: _containers.RepeatedScalarFieldContainer[int]
    sampling: _types_pb2.SamplingParams
    placement: str
    preemption: str
    def __init__(self, request_id: _Optional[str] = ..., prompt_token_ids: _Optional[_Iterable[int]] = ..., sampling: _Optional[_Union[_types_pb2.SamplingParams, _Mapping]] = ..., placement: _Optional[str] = ..., preemption: _Optional[str] = ...) -> None: ...

class DispatchResponse(_message.Message):
    __slots__ = ("gpu_blocks", "host_blocks")
    GPU_BLOCKS_FIELD_NUMBER: _ClassVar[int]
    HOST_BLOCKS_FIELD_NUMBER: _ClassVar[int]
    gpu_blocks: int
    host_blocks: int
    def __init__(self, gpu_blocks: _Optional[int] = ..., host_blocks: _Optional[int] = ...) -> None: ...

class DispatchBatchRequest(_message.Message):
    __slots__ = ("requests",)
    REQUESTS_FIELD_NUMBER: _ClassVar[int]
    requests: _containers.RepeatedCompositeFieldContainer[DispatchRequest]
    def __init__(self, requests: _Optional[_Iterable[_Union[DispatchRequest, _Mapping]]] = ...) -> None: ...

class DispatchResult(_message.Message):
    __slots__ = ("status", "message", "gpu_blocks", "host_blocks")
    STATUS_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    GPU_BLOCKS_FIELD_NUMBER: _ClassVar[int]
    HOST_BLOCKS_FIELD_NUMBER: _ClassVar[int]
    status: DispatchStatus
    message: str
    gpu_blocks: int
    host_blocks: int
    def __init__(self, status: _Optional[_Union[DispatchStatus, str]] = ..., message: _Optional[str] = ..., gpu_blocks: _Optional[int] = ..., host_blocks: _Optional[int] = ...) -> None: ...

class DispatchBatchResponse(_message.Message):
    __slots__ = ("results",)
    RESULTS_FIELD_NUMBER: _ClassVar[int]
    results: _containers.RepeatedCompositeFieldContainer[DispatchResult]
    def __init__(self, results: _Optional[_Iterable[_Union[DispatchResult, _Mapping]]] = ...) -> None: ...

class StreamEventsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class TokenUpdate(_message.Message):
    __slots__ = ("request_id", "token_ids", "finished", "finish_reason", "error")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    FINISHED_FIELD_NUMBER: _ClassVar[int]
    FINISH_REASON_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    token_ids: _containers.RepeatedScalarFieldContainer[int]
    finished: bool
    finish_reason: _types_pb2.FinishReason
    error: str
    def __init__(self, request_id: _Optional[str] = ..., token_ids: _Optional[_Iterable[int]] = ..., finished: bool = ..., finish_reason: _Optional[_Union[_types_pb2.FinishReason, str]] = ..., error: _Optional[str] = ...) -> None: ...

class RunningRequest(_message.Message):
    __slots__ = ("request_id", "tokens_generated", "decode_time_s", "context_tokens", "placement")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    TOKENS_GENERATED_FIELD_NUMBER: _ClassVar[int]
    DECODE_TIME_S_FIELD_NUMBER: _ClassVar[int]
    CONTEXT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    PLACEMENT_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    tokens_generated: int
    decode_time_s: float
    context_tokens: int
    placement: str
    def __init__(self, request_id: _Optional[str] = ..., tokens_generated: _Optional[int] = ..., decode_time_s: _Optional[float] = ..., context_tokens: _Optional[int] = ..., placement: _Optional[str] = ...) -> None: ...

class StepReport(_message.Message):
    __slots__ = ("step", "kind", "duration_s", "num_tokens", "bytes_offloaded", "bytes_loaded", "copy_wait_s", "num_prefill_tokens", "num_decode_requests", "num_preemptions", "num_swapped_layers")
    STEP_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    DURATION_S_FIELD_NUMBER: _ClassVar[int]
    NUM_TOKENS_FIELD_NUMBER: _ClassVar[int]
    BYTES_OFFLOADED_FIELD_NUMBER: _ClassVar[int]
    BYTES_LOADED_FIELD_NUMBER: _ClassVar[int]
    COPY_WAIT_S_FIELD_NUMBER: _ClassVar[int]
    NUM_PREFILL_TOKENS_FIELD_NUMBER: _ClassVar[int]
    NUM_DECODE_REQUESTS_FIELD_NUMBER: _ClassVar[int]
    NUM_PREEMPTIONS_FIELD_NUMBER: _ClassVar[int]
    NUM_SWAPPED_LAYERS_FIELD_NUMBER: _ClassVar[int]
    step: int
    kind: str
    duration_s: float
    num_tokens: int
    bytes_offloaded: int
    bytes_loaded: int
    copy_wait_s: float
    num_prefill_tokens: int
    num_decode_requests: int
    num_preemptions: int
    num_swapped_layers: int
    def __init__(self, step: _Optional[int] = ..., kind: _Optional[str] = ..., duration_s: _Optional[float] = ..., num_tokens: _Optional[int] = ..., bytes_offloaded: _Optional[int] = ..., bytes_loaded: _Optional[int] = ..., copy_wait_s: _Optional[float] = ..., num_prefill_tokens: _Optional[int] = ..., num_decode_requests: _Optional[int] = ..., num_preemptions: _Optional[int] = ..., num_swapped_layers: _Optional[int] = ...) -> None: ...

class StreamEventsResponse(_message.Message):
    __slots__ = ("tokens", "running", "gpu", "host", "step", "admitted_request_ids", "waiting_request_ids", "preempted_request_ids")
    TOKENS_FIELD_NUMBER: _ClassVar[int]
    RUNNING_FIELD_NUMBER: _ClassVar[int]
    GPU_FIELD_NUMBER: _ClassVar[int]
    HOST_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    ADMITTED_REQUEST_IDS_FIELD_NUMBER: _ClassVar[int]
    WAITING_REQUEST_IDS_FIELD_NUMBER: _ClassVar[int]
    PREEMPTED_REQUEST_IDS_FIELD_NUMBER: _ClassVar[int]
    tokens: _containers.RepeatedCompositeFieldContainer[TokenUpdate]
    running: _containers.RepeatedCompositeFieldContainer[RunningRequest]
    gpu: _types_pb2.TierUsage
    host: _types_pb2.TierUsage
    step: StepReport
    admitted_request_ids: _containers.RepeatedScalarFieldContainer[str]
    waiting_request_ids: _containers.RepeatedScalarFieldContainer[str]
    preempted_request_ids: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, tokens: _Optional[_Iterable[_Union[TokenUpdate, _Mapping]]] = ..., running: _Optional[_Iterable[_Union[RunningRequest, _Mapping]]] = ..., gpu: _Optional[_Union[_types_pb2.TierUsage, _Mapping]] = ..., host: _Optional[_Union[_types_pb2.TierUsage, _Mapping]] = ..., step: _Optional[_Union[StepReport, _Mapping]] = ..., admitted_request_ids: _Optional[_Iterable[str]] = ..., waiting_request_ids: _Optional[_Iterable[str]] = ..., preempted_request_ids: _Optional[_Iterable[str]] = ...) -> None: ...

class AbortRequest(_message.Message):
    __slots__ = ("request_id",)
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    def __init__(self, request_id: _Optional[str] = ...) -> None: ...

class AbortResponse(_message.Message):
    __slots__ = ("aborted",)
    ABORTED_FIELD_NUMBER: _ClassVar[int]
    aborted: bool
    def __init__(self, aborted: bool = ...) -> None: ...

class ProfileRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ProfileResponse(_message.Message):
    __slots__ = ("cost_model", "profile")
    COST_MODEL_FIELD_NUMBER: _ClassVar[int]
    PROFILE_FIELD_NUMBER: _ClassVar[int]
    cost_model: _types_pb2.CostModel
    profile: _types_pb2.ProfileInfo
    def __init__(self, cost_model: _Optional[_Union[_types_pb2.CostModel, _Mapping]] = ..., profile: _Optional[_Union[_types_pb2.ProfileInfo, _Mapping]] = ...) -> None: ...
