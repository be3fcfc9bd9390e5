"""Conversions between the engine's typed messages and the WorkerService protobuf messages.

Kept apart from the servicer so the mapping is in one place and testable without a server. This
module imports no torch: it only reads the engine's plain dataclasses (worker_svc.outputs).
"""

from __future__ import annotations

from common import wire
from common.proto.layerkv.v1 import types_pb2, worker_pb2
from common.types import SamplingParams
from common.wire import finish_reason_to_proto
from worker_svc.outputs import KVUsage, RunningState, StepOutput, TierUsage

# Used when a dispatch leaves max_tokens at 0 ("the server default"); the scheduler normally fills it.
DEFAULT_MAX_TOKENS = 16


def sampling_from_proto(msg: types_pb2.SamplingParams) -> SamplingParams:
    return wire.sampling_from_proto(msg, DEFAULT_MAX_TOKENS)


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
            num_prefill_tokens=s.num_prefill_tokens,
            num_decode_requests=s.num_decode_requests,
            num_preemptions=s.num_preemptions,
            num_swapped_layers=s.num_swapped_layers,
        ),
        admitted_request_ids=list(out.admitted),
        waiting_request_ids=list(out.waiting),
        preempted_request_ids=list(out.preempted),
    )


def state_to_proto(usage: KVUsage, running: tuple[RunningState, ...]) -> worker_pb2.StreamEventsResponse:
    """A state-only event (no step ran): sent to a new subscriber and as an idle heartbeat."""
    return worker_pb2.StreamEventsResponse(
        running=[running_to_proto(r) for r in running],
        gpu=tier_usage_to_proto(usage.gpu),
        host=tier_usage_to_proto(usage.host),
        step=worker_pb2.StepReport(kind="idle"),
    )
