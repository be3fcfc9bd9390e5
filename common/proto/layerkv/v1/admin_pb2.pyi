from google.protobuf import struct_pb2 as _struct_pb2
from common.proto.layerkv.v1 import types_pb2 as _types_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from typing import ClassVar as _ClassVar, Iterable as _Iterable, Mapping as _Mapping, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class PolicySpec(_message.Message):
    __slots__ = ("name", "params")
    NAME_FIELD_NUMBER: _ClassVar[int]
    PARAMS_FIELD_NUMBER: _ClassVar[int]
    name: str
    params: _struct_pb2.Struct
    def __init__(self, name: _Optional[str] = ..., params: _Optional[_Union[_struct_pb2.Struct, _Mapping]] = ...) -> None: ...

class PolicyInfo(_message.Message):
    __slots__ = ("name", "description", "params_schema_json", "defaults")
    NAME_FIELD_NUMBER: _ClassVar[int]
    DESCRIPTION_FIELD_NUMBER: _ClassVar[int]
    PARAMS_SCHEMA_JSON_FIELD_NUMBER: _ClassVar[int]
    DEFAULTS_FIELD_NUMBER: _ClassVar[int]
    name: str
    description: str
    params_schema_json: str
    defaults: _struct_pb2.Struct
    def __init__(self, name: _Optional[str] = ..., description: _Optional[str] = ..., params_schema_json: _Optional[str] = ..., defaults: _Optional[_Union[_struct_pb2.Struct, _Mapping]] = ...) -> None: ...

class ListPoliciesRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ListPoliciesResponse(_message.Message):
    __slots__ = ("policies",)
    POLICIES_FIELD_NUMBER: _ClassVar[int]
    policies: _containers.RepeatedCompositeFieldContainer[PolicyInfo]
    def __init__(self, policies: _Optional[_Iterable[_Union[PolicyInfo, _Mapping]]] = ...) -> None: ...

class GetPolicyRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class GetPolicyResponse(_message.Message):
    __slots__ = ("policy",)
    POLICY_FIELD_NUMBER: _ClassVar[int]
    policy: PolicySpec
    def __init__(self, policy: _Optional[_Union[PolicySpec, _Mapping]] = ...) -> None: ...

class SetPolicyRequest(_message.Message):
    __slots__ = ("policy",)
    POLICY_FIELD_NUMBER: _ClassVar[int]
    policy: PolicySpec
    def __init__(self, policy: _Optional[_Union[PolicySpec, _Mapping]] = ...) -> None: ...

class SetPolicyResponse(_message.Message):
    __slots__ = ("previous", "current")
    PREVIOUS_FIELD_NUMBER: _ClassVar[int]
    CURRENT_FIELD_NUMBER: _ClassVar[int]
    previous: PolicySpec
    current: PolicySpec
    def __init__(self, previous: _Optional[_Union[PolicySpec, _Mapping]] = ..., current: _Optional[_Union[PolicySpec, _Mapping]] = ...) -> None: ...

class WorkerInfo(_message.Message):
    __slots__ = ("worker_id", "address", "model", "geometry", "gpu", "host", "reserved_gpu_blocks", "reserved_host_blocks", "running_request_ids", "healthy", "draining", "cost_model", "profiled_cost_model", "profile", "fit")
    WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    GEOMETRY_FIELD_NUMBER: _ClassVar[int]
    GPU_FIELD_NUMBER: _ClassVar[int]
    HOST_FIELD_NUMBER: _ClassVar[int]
    RESERVED_GPU_BLOCKS_FIELD_NUMBER: _ClassVar[int]
    RESERVED_HOST_BLOCKS_FIELD_NUMBER: _ClassVar[int]
    RUNNING_REQUEST_IDS_FIELD_NUMBER: _ClassVar[int]
    HEALTHY_FIELD_NUMBER: _ClassVar[int]
    DRAINING_FIELD_NUMBER: _ClassVar[int]
    COST_MODEL_FIELD_NUMBER: _ClassVar[int]
    PROFILED_COST_MODEL_FIELD_NUMBER: _ClassVar[int]
    PROFILE_FIELD_NUMBER: _ClassVar[int]
    FIT_FIELD_NUMBER: _ClassVar[int]
    worker_id: str
    address: str
    model: str
    geometry: _types_pb2.KvGeometry
    gpu: _types_pb2.TierUsage
    host: _types_pb2.TierUsage
    reserved_gpu_blocks: int
    reserved_host_blocks: int
    running_request_ids: _containers.RepeatedScalarFieldContainer[str]
    healthy: bool
    draining: bool
    cost_model: _types_pb2.CostModel
    profiled_cost_model: _types_pb2.CostModel
    profile: _types_pb2.ProfileInfo
    fit: CostFitReport
    def __init__(self, worker_id: _Optional[str] = ..., address: _Optional[str] = ..., model: _Optional[str] = ..., geometry: _Optional[_Union[_types_pb2.KvGeometry, _Mapping]] = ..., gpu: _Optional[_Union[_types_pb2.TierUsage, _Mapping]] = ..., host: _Optional[_Union[_types_pb2.TierUsage, _Mapping]] = ..., reserved_gpu_blocks: _Optional[int] = ..., reserved_host_blocks: _Optional[int] = ..., running_request_ids: _Optional[_Iterable[str]] = ..., healthy: bool = ..., draining: bool = ..., cost_model: _Optional[_Union[_types_pb2.CostModel, _Mapping]] = ..., profiled_cost_model: _Optional[_Union[_types_pb2.CostModel, _Mapping]] = ..., profile: _Optional[_Union[_types_pb2.ProfileInfo, _Mapping]] = ..., fit: _Optional[_Union[CostFitReport, _Mapping]] = ...) -> None: ...

class CostFitReport(_message.Message):
    __slots__ = ("decode_error", "decode_steps", "prefill_error", "prefill_steps", "window", "steps_fitted")
    DECODE_ERROR_FIELD_NUMBER: _ClassVar[int]
    DECODE_STEPS_FIELD_NUMBER: _ClassVar[int]
    PREFILL_ERROR_FIELD_NUMBER: _ClassVar[int]
    PREFILL_STEPS_FIELD_NUMBER: _ClassVar[int]
    WINDOW_FIELD_NUMBER: _ClassVar[int]
    STEPS_FITTED_FIELD_NUMBER: _ClassVar[int]
    decode_error: float
    decode_steps: int
    prefill_error: float
    prefill_steps: int
    window: int
    steps_fitted: int
    def __init__(self, decode_error: _Optional[float] = ..., decode_steps: _Optional[int] = ..., prefill_error: _Optional[float] = ..., prefill_steps: _Optional[int] = ..., window: _Optional[int] = ..., steps_fitted: _Optional[int] = ...) -> None: ...

class ListWorkersRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ListWorkersResponse(_message.Message):
    __slots__ = ("workers",)
    WORKERS_FIELD_NUMBER: _ClassVar[int]
    workers: _containers.RepeatedCompositeFieldContainer[WorkerInfo]
    def __init__(self, workers: _Optional[_Iterable[_Union[WorkerInfo, _Mapping]]] = ...) -> None: ...

class DrainWorkerRequest(_message.Message):
    __slots__ = ("worker_id",)
    WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    worker_id: str
    def __init__(self, worker_id: _Optional[str] = ...) -> None: ...

class DrainWorkerResponse(_message.Message):
    __slots__ = ("worker",)
    WORKER_FIELD_NUMBER: _ClassVar[int]
    worker: WorkerInfo
    def __init__(self, worker: _Optional[_Union[WorkerInfo, _Mapping]] = ...) -> None: ...

class RegisterWorkerRequest(_message.Message):
    __slots__ = ("address",)
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    address: str
    def __init__(self, address: _Optional[str] = ...) -> None: ...

class RegisterWorkerResponse(_message.Message):
    __slots__ = ("worker_id",)
    WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    worker_id: str
    def __init__(self, worker_id: _Optional[str] = ...) -> None: ...

class UndrainWorkerRequest(_message.Message):
    __slots__ = ("worker_id",)
    WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    worker_id: str
    def __init__(self, worker_id: _Optional[str] = ...) -> None: ...

class UndrainWorkerResponse(_message.Message):
    __slots__ = ("worker",)
    WORKER_FIELD_NUMBER: _ClassVar[int]
    worker: WorkerInfo
    def __init__(self, worker: _Optional[_Union[WorkerInfo, _Mapping]] = ...) -> None: ...

class ProfileWorkerRequest(_message.Message):
    __slots__ = ("worker_id",)
    WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    worker_id: str
    def __init__(self, worker_id: _Optional[str] = ...) -> None: ...

class ProfileWorkerResponse(_message.Message):
    __slots__ = ("worker",)
    WORKER_FIELD_NUMBER: _ClassVar[int]
    worker: WorkerInfo
    def __init__(self, worker: _Optional[_Union[WorkerInfo, _Mapping]] = ...) -> None: ...
