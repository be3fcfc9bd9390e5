"""Conversions between the shared domain types and their protobuf messages (torch-free).

Both services speak these messages (sampling, finish reasons, KV geometry, cost model and its profile), so the
mapping lives once here; each service's own ``wire`` module converts only what is its alone.
"""

from __future__ import annotations

import math

import grpc

from common.cost_profile import ProfileInfo, ProfileSource
from common.errors import InvalidArgument
from common.grpc_errors import clip_details, status_of
from common.proto.layerkv.v1 import types_pb2, worker_pb2
from common.types import CostModel, FinishReason, KVGeometry, SamplingParams

FINISH_TO_PROTO: dict[FinishReason, types_pb2.FinishReason] = {
    FinishReason.STOP: types_pb2.FINISH_REASON_STOP,
    FinishReason.LENGTH: types_pb2.FINISH_REASON_LENGTH,
    FinishReason.ABORT: types_pb2.FINISH_REASON_ABORT,
    FinishReason.ERROR: types_pb2.FINISH_REASON_ERROR,
}


FINISH_FROM_PROTO: dict[int, FinishReason] = {proto: reason for reason, proto in FINISH_TO_PROTO.items()}


def finish_reason_to_proto(reason: FinishReason | None) -> types_pb2.FinishReason:
    return types_pb2.FINISH_REASON_UNSPECIFIED if reason is None else FINISH_TO_PROTO[reason]


def sampling_from_proto(msg: types_pb2.SamplingParams, default_max_tokens: int) -> SamplingParams:
    """Wire sampling values → ``SamplingParams`` (0 means the default); bad values → InvalidArgument."""
    for name, value in (("temperature", msg.temperature), ("top_p", msg.top_p)):
        if not math.isfinite(value):
            raise InvalidArgument(f"{name} must be a finite number, got {value}")
    return SamplingParams(
        max_tokens=msg.max_tokens or default_max_tokens,
        temperature=float(msg.temperature),
        top_p=float(msg.top_p) if msg.top_p else 1.0,
        top_k=int(msg.top_k),
        seed=int(msg.seed) if msg.HasField("seed") else None,
        stop_token_ids=tuple(int(t) for t in msg.stop_token_ids),
        ignore_eos=bool(msg.ignore_eos),
    )


def sampling_to_proto(s: SamplingParams, max_tokens: int | None = None) -> types_pb2.SamplingParams:
    out = types_pb2.SamplingParams(
        max_tokens=s.max_tokens if max_tokens is None else max_tokens,
        temperature=s.temperature,
        top_p=s.top_p,
        top_k=s.top_k,
        stop_token_ids=list(s.stop_token_ids),
        ignore_eos=s.ignore_eos,
    )
    if s.seed is not None:
        out.seed = s.seed
    return out


def geometry_to_proto(g: KVGeometry) -> types_pb2.KvGeometry:
    return types_pb2.KvGeometry(num_layers=g.num_layers, num_kv_heads=g.num_kv_heads,
                                head_dim=g.head_dim, block_size=g.block_size, dtype_bytes=g.dtype_bytes)


def geometry_from_proto(g: types_pb2.KvGeometry) -> KVGeometry:
    return KVGeometry(g.num_layers, g.num_kv_heads, g.head_dim, g.block_size, g.dtype_bytes)


_COST_FIELDS = tuple(CostModel.__dataclass_fields__)


def cost_model_to_proto(c: CostModel) -> types_pb2.CostModel:
    return types_pb2.CostModel(**{name: getattr(c, name) for name in _COST_FIELDS})


def cost_model_from_proto(c: types_pb2.CostModel) -> CostModel:
    """Zero bandwidths or correction (fields a worker left unset) take the defaults, never 0."""
    values = {name: getattr(c, name) for name in _COST_FIELDS}
    for name in ("d2h_bytes_per_s", "h2d_bytes_per_s", "correction"):
        if not values[name]:
            del values[name]
    return CostModel(**values)


_SOURCES = {s.value: s for s in ProfileSource}


def profile_info_to_proto(info: ProfileInfo) -> types_pb2.ProfileInfo:
    return types_pb2.ProfileInfo(source=info.source.value, duration_s=info.duration_s,
                                 measured_unix_s=info.measured_unix_s)


def profile_info_from_proto(p: types_pb2.ProfileInfo) -> ProfileInfo:
    """An unset or unknown source (an older or newer worker) reads as the defaults."""
    return ProfileInfo(_SOURCES.get(p.source, ProfileSource.DEFAULT), p.duration_s, p.measured_unix_s)


def dispatch_error_to_proto(exc: Exception) -> worker_pb2.DispatchResult:
    """One ``DispatchBatch`` item's error as the status ``Dispatch`` would have answered alone:
    INVALID_ARGUMENT is rejected, RESOURCE_EXHAUSTED refused, any other code failed (its name first
    in the message; a bug, INTERNAL, names only its type, as a status would)."""
    code = status_of(exc)
    message = clip_details(str(exc) or type(exc).__name__)
    if code is grpc.StatusCode.INVALID_ARGUMENT:
        return worker_pb2.DispatchResult(status=worker_pb2.DISPATCH_STATUS_REJECTED, message=message)
    if code is grpc.StatusCode.RESOURCE_EXHAUSTED:
        return worker_pb2.DispatchResult(status=worker_pb2.DISPATCH_STATUS_REFUSED, message=message)
    if code is grpc.StatusCode.INTERNAL:
        message = f"internal error in DispatchBatch: {type(exc).__name__}"
    failed = worker_pb2.DISPATCH_STATUS_FAILED
    return worker_pb2.DispatchResult(status=failed, message=f"{code.name}: {message}")
