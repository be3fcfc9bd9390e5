"""Conversions between the engine's typed messages and the WorkerService protobuf messages.

Kept apart from the servicer so the mapping is in one place and testable without a server. This
module imports no torch: it only reads the engine's plain dataclasses (worker_svc.outputs).
"""

from __future__ import annotations

import math

from common.errors import InvalidArgument
from common.proto.layerkv.v1 import types_pb2, worker_pb2
from common.types import CostModel, FinishReason, KVGeometry, SamplingParams
from worker_svc.outputs import KVUsage, RunningState, StepOutput, TierUsage

# Used when a dispatch leaves max_tokens at 0 ("the server default"); the scheduler normally fills it.
DEFAULT_MAX_TOKENS = 16

_FINISH_TO_PROTO: dict[FinishReason, types_pb2.FinishReason] = {
    FinishReason.STOP: types_pb2.FINISH_REASON_STOP,
    FinishReason.LENGTH: types_pb2.FINISH_REASON_LENGTH,
    FinishReason.ABORT: types_pb2.FINISH_REASON_ABORT,
    FinishReason.ERROR: types_pb2.FINISH_REASON_ERROR,
}


def sampling_from_proto(
    msg: types_pb2.SamplingParams, default_max_tokens: int = DEFAULT_MAX_TOKENS
) -> SamplingParams:
    """The domain SamplingParams of a wire message (InvalidArgument for bad values)."""
    if not math.isfinite(msg.temperature) or not math.isfinite(msg.top_p):
        raise InvalidArgument(f"temperature and top_p must be finite, got {msg.temperature}, {msg.top_p}")
    return SamplingParams(
        max_tokens=msg.max_tokens or default_max_tokens,
        temperature=float(msg.temperature),
        top_p=float(msg.top_p) if msg.top_p != 0.0 else 1.0,
        top_k=int(msg.top_k),
        seed=int(msg.seed) if msg.HasField("seed") else None,
        stop_token_ids=tuple(int(t) for t in msg.stop_token_ids),
        ignore_eos=bool(msg.ignore_eos),
    )


def finish_reason_to_proto(reason: FinishReason | None) -> types_pb2.FinishReason:
    if reason is None:
        return types_pb2.FINISH_REASON_UNSPECIFIED
    return _FINISH_TO_PROTO[reason]


def geometry_to_proto(g: KVGeometry) -> types_pb2.KvGeometry:
    return types_pb2.KvGeometry(
        num_layers=g.num_layers,
        num_kv_heads=g.num_kv_heads,
        head_dim=g.head_dim,
        block_size=g.block_size,
        dtype_bytes=g.dtype_bytes,
    )


def cost_model_to_proto(c: CostModel) -> types_pb2.CostModel:
    return types_pb2.CostModel(
        d2h_bytes_per_s=c.d2h_bytes_per_s,
        h2d_bytes_per_s=c.h2d_bytes_per_s,
        prefill_base_s=c.prefill_base_s,
        prefill_per_token_s=c.prefill_per_token_s,
        prefill_per_token2_s=c.prefill_per_token2_s,
        decode_base_s=c.decode_base_s,
        decode_per_request_s=c.decode_per_request_s,
        decode_per_context_token_s=c.decode_per_context_token_s,
        correction=c.correction,
    )


def tier_usage_to_proto(usage: TierUsage) -> types_pb2.TierUsage:
    return types_pb2.TierUsage(
        total_blocks=usage.total_blocks,
        free_blocks=usage.free_blocks,
        used_blocks_per_layer=list(usage.used_per_layer),
    )


def running_to_proto(r: RunningState) -> worker_pb2.RunningRequest:
    return worker_pb2.RunningRequest(
        request_id=r.request_id,
        tokens_generated=r.tokens_generated,
        decode_time_s=r.decode_time_s,
        context_tokens=r.context_tokens,
        placement=r.placement,
    )


def step_to_proto(out: StepOutput) -> worker_pb2.StreamEventsResponse:
    """One engine ``StepOutput`` as one StreamEventsResponse."""
    s = out.stats
    return worker_pb2.StreamEventsResponse(
        tokens=[
            worker_pb2.TokenUpdate(
                request_id=o.request_id,
                token_ids=list(o.new_token_ids),
                finished=o.finished,
                finish_reason=finish_reason_to_proto(o.finish_reason),
                error=o.error or "",
            )
            for o in out.outputs
        ],
        running=[running_to_proto(r) for r in out.running],
        gpu=tier_usage_to_proto(out.usage.gpu),
        host=tier_usage_to_proto(out.usage.host),
        step=worker_pb2.StepReport(
            step=s.step,
            kind=s.kind,
            duration_s=s.duration_s,
            num_tokens=s.num_tokens,
            bytes_offloaded=s.bytes_offloaded,
            bytes_loaded=s.bytes_loaded,
            copy_wait_s=s.copy_wait_s,
        ),
        admitted_request_ids=list(out.admitted),
    )


def state_to_proto(usage: KVUsage, running: tuple[RunningState, ...]) -> worker_pb2.StreamEventsResponse:
    """A state-only event (no step ran): sent to a new subscriber and as an idle heartbeat."""
    return worker_pb2.StreamEventsResponse(
        running=[running_to_proto(r) for r in running],
        gpu=tier_usage_to_proto(usage.gpu),
        host=tier_usage_to_proto(usage.host),
        step=worker_pb2.StepReport(kind="idle"),
    )
