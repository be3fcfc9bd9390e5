"""Conversions between the scheduler's typed state and the protobuf messages of its APIs. It is the
only scheduler code that builds or reads the worker API's messages: descriptions, tokenizers and
events are decoded into typed values here, dispatches and aborts encoded (they stop here)."""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import TYPE_CHECKING

from common import wire
from common.cost_profile import CostProfile
from common.errors import InvalidArgument, LayerKVError
from common.proto.layerkv.v1 import admin_pb2, scheduler_pb2, types_pb2, worker_pb2
from common.store import RequestRecord
from common.tokenizer import Tokenizer, tokenizer_from_wire
from common.types import FinishReason, Placement, TierCapacity
from common.wire import (
    cost_model_from_proto,
    cost_model_to_proto,
    geometry_from_proto,
    geometry_to_proto,
    profile_info_from_proto,
    profile_info_to_proto,
    sampling_to_proto,
)
from scheduler_svc.cost_fit import FitReport
from scheduler_svc.ledger import WorkerBudget
from scheduler_svc.requests import FINISHED, RUNNING, WAITING, sampling_from_dict
from scheduler_svc.worker_events import (
    DispatchCommand,
    DispatchOutcomeUnknown,
    DispatchRefused,
    DispatchRejected,
    RunningReport,
    StepInfo,
    StepKind,
    TierReport,
    TokenUpdate,
    WorkerDescription,
    WorkerEvent,
)

if TYPE_CHECKING:  # the pool dials through worker_client, which encodes with this module
    from scheduler_svc.worker_pool import WorkerHandle

# Records store the finish reason as its string value ("" while unfinished).
FINISH_TO_PROTO = {reason.value: proto for reason, proto in wire.FINISH_TO_PROTO.items()}
STATUS_TO_PROTO = {
    WAITING: scheduler_pb2.REQUEST_STATUS_WAITING,
    RUNNING: scheduler_pb2.REQUEST_STATUS_RUNNING,
    FINISHED: scheduler_pb2.REQUEST_STATUS_FINISHED,
}


def slo_to_proto(record: RequestRecord) -> types_pb2.Slo:
    slo = types_pb2.Slo()
    if record.ttft_slo_s is not None:
        slo.ttft_s = record.ttft_slo_s
    if record.tpot_slo_s is not None:
        slo.tpot_s = record.tpot_slo_s
    return slo


def final_from_record(record: RequestRecord) -> scheduler_pb2.GenerateFinal:
    r = record
    ttft = r.first_token_time - r.arrival_time if r.first_token_time else 0.0
    tpot = (r.finish_time - r.first_token_time) / (r.output_tokens - 1) if r.output_tokens > 1 else 0.0
    return scheduler_pb2.GenerateFinal(
        finish_reason=FINISH_TO_PROTO.get(r.finish_reason, types_pb2.FINISH_REASON_UNSPECIFIED),
        prompt_tokens=len(r.prompt_ids),
        output_tokens=r.output_tokens,
        queue_s=max(0.0, r.dispatch_time - r.arrival_time) if r.dispatch_time else 0.0,
        ttft_s=max(0.0, ttft),
        latency_s=max(0.0, r.finish_time - r.arrival_time) if r.finish_time else 0.0,
        tpot_s=max(0.0, tpot),
        error=r.error,
    )


def request_info(record: RequestRecord, output_tokens: int) -> scheduler_pb2.RequestInfo:
    r = record
    return scheduler_pb2.RequestInfo(
        request_id=r.request_id,
        status=STATUS_TO_PROTO.get(r.status, scheduler_pb2.REQUEST_STATUS_UNSPECIFIED),
        finish_reason=FINISH_TO_PROTO.get(r.finish_reason, types_pb2.FINISH_REASON_UNSPECIFIED),
        prompt_tokens=len(r.prompt_ids),
        output_tokens=output_tokens,
        worker_id=r.worker_id,
        placement=r.placement,
        arrival_time=r.arrival_time,
        dispatch_time=r.dispatch_time,
        first_token_time=r.first_token_time,
        finish_time=r.finish_time,
        sampling=sampling_to_proto(sampling_from_dict(r.sampling)),
        slo=slo_to_proto(r),
        requeues=r.requeues,
        error=r.error,
    )


def worker_info(
    handle: WorkerHandle, budget: WorkerBudget | None, running_ids: list[str]
) -> admin_pb2.WorkerInfo:
    d = handle.description
    info = admin_pb2.WorkerInfo(
        worker_id=handle.worker_id,
        address=handle.address,
        healthy=handle.healthy,
        draining=handle.draining,
        running_request_ids=running_ids,
    )
    if d is not None:
        info.model = d.model
        info.geometry.CopyFrom(geometry_to_proto(d.geometry))
        # the cost model as refitted from this worker's step timings, else as it described itself
        model = handle.fitter.model() if handle.fitter is not None else d.cost_model
        info.cost_model.CopyFrom(cost_model_to_proto(model))
        info.profiled_cost_model.CopyFrom(cost_model_to_proto(d.cost_model))
        info.profile.CopyFrom(profile_info_to_proto(d.profile))
    if handle.fitter is not None:
        info.fit.CopyFrom(fit_report_to_proto(handle.fitter.report()))
    if budget is not None:
        for report, target in ((budget.gpu, info.gpu), (budget.host, info.host)):
            target.CopyFrom(
                types_pb2.TierUsage(
                    total_blocks=report.total_blocks,
                    free_blocks=report.free_blocks,
                    used_blocks_per_layer=list(report.used_per_layer),
                )
            )
        # promised but not yet in the worker's report, plus the policies' growth headroom
        info.reserved_gpu_blocks = budget.gpu_reserved + budget.headroom.gpu_blocks
        info.reserved_host_blocks = budget.host_reserved + budget.headroom.host_blocks
    return info


def fit_report_to_proto(r: FitReport) -> admin_pb2.CostFitReport:
    return admin_pb2.CostFitReport(
        decode_error=r.decode.mean_relative_error, decode_steps=r.decode.steps,
        prefill_error=r.prefill.mean_relative_error, prefill_steps=r.prefill.steps,
        window=r.window, steps_fitted=r.steps_fitted,
    )


# ---- the worker API (the only scheduler code that touches worker_pb2) ----

DESCRIBE_REQUEST = worker_pb2.DescribeRequest()
TOKENIZER_REQUEST = worker_pb2.GetTokenizerRequest()
EVENTS_REQUEST = worker_pb2.StreamEventsRequest()


def describe_from_proto(d: worker_pb2.DescribeResponse) -> WorkerDescription:
    return WorkerDescription(
        worker_id=d.worker_id,
        model=d.model,
        geometry=geometry_from_proto(d.geometry),
        capacity=TierCapacity(d.gpu_blocks, d.host_blocks),
        cost_model=cost_model_from_proto(d.cost_model),
        max_model_len=d.max_model_len,
        eos_token_id=d.eos_token_id,
        staging_blocks=d.staging_blocks,
        preemption_mode=d.preemption_mode,
        max_num_batched_tokens=d.max_num_batched_tokens,
        vocab_size=d.vocab_size,
        profile=profile_info_from_proto(d.profile),
    )


PROFILE_REQUEST = worker_pb2.ProfileRequest()


def profile_from_proto(p: worker_pb2.ProfileResponse) -> CostProfile:
    return CostProfile(cost_model_from_proto(p.cost_model), profile_info_from_proto(p.profile))


def tokenizer_from_proto(t: worker_pb2.GetTokenizerResponse) -> Tokenizer:
    return tokenizer_from_wire(t.kind, t.tokenizer_json, t.chat_template, t.bos_token, t.eos_token)


_STEP_KINDS = {k.value: k for k in StepKind}


def _tier(usage: types_pb2.TierUsage) -> TierReport:
    return TierReport(usage.total_blocks, usage.free_blocks, tuple(usage.used_blocks_per_layer))


@functools.lru_cache(maxsize=4096)
def _placement(letters: str, num_layers: int) -> Placement:
    # Cached: every event lists every running request's placement, and a fleet uses a handful.
    try:
        return Placement.from_letters(letters, num_layers)
    except InvalidArgument:  # a worker that reports no placement: count it as all-GPU
        return Placement.all_gpu(num_layers)


def worker_event_from_proto(event: worker_pb2.StreamEventsResponse, num_layers: int) -> WorkerEvent:
    """Decode one StreamEvents message (``num_layers`` of the worker's model, for placements)."""
    step = None
    if event.HasField("step"):
        s = event.step
        step = StepInfo(
            step=s.step,
            kind=_STEP_KINDS.get(s.kind, StepKind.UNKNOWN),
            duration_s=s.duration_s,
            num_tokens=s.num_tokens,
            bytes_offloaded=s.bytes_offloaded,
            bytes_loaded=s.bytes_loaded,
            copy_wait_s=s.copy_wait_s,
            num_prefill_tokens=s.num_prefill_tokens,
            num_decode_requests=s.num_decode_requests,
            num_preemptions=s.num_preemptions,
            num_swapped_layers=s.num_swapped_layers,
        )
    return WorkerEvent(
        tokens=tuple(
            TokenUpdate(
                u.request_id,
                tuple(u.token_ids),
                u.finished,
                wire.FINISH_FROM_PROTO.get(u.finish_reason, FinishReason.ERROR) if u.finished else None,
                u.error,
            )
            for u in event.tokens
        ),
        running=tuple(
            RunningReport(
                r.request_id,
                _placement(r.placement, num_layers),
                r.decode_time_s,
                r.context_tokens,
                r.tokens_generated,
            )
            for r in event.running
        ),
        gpu=_tier(event.gpu) if event.HasField("gpu") else None,
        host=_tier(event.host) if event.HasField("host") else None,
        admitted=tuple(event.admitted_request_ids),
        step=step,
        waiting=tuple(event.waiting_request_ids),
        preempted=tuple(event.preempted_request_ids),
    )


def dispatch_to_proto(command: DispatchCommand) -> worker_pb2.DispatchRequest:
    return worker_pb2.DispatchRequest(
        request_id=command.worker_request_id,
        prompt_token_ids=list(command.prompt_ids),
        sampling=sampling_to_proto(command.sampling, max_tokens=command.max_tokens),
        placement=command.placement,
        preemption=command.preemption.value,
    )


def dispatch_batch_to_proto(commands: Sequence[DispatchCommand]) -> worker_pb2.DispatchBatchRequest:
    return worker_pb2.DispatchBatchRequest(requests=[dispatch_to_proto(c) for c in commands])


def dispatch_outcome_from_proto(result: worker_pb2.DispatchResult) -> LayerKVError | None:
    """One DispatchBatch result as its typed outcome: None when taken, else the error a unary
    Dispatch with that status would have raised."""
    status = result.status
    if status == worker_pb2.DISPATCH_STATUS_ACCEPTED:
        return None
    if status == worker_pb2.DISPATCH_STATUS_REFUSED:
        return DispatchRefused(result.message)
    if status == worker_pb2.DISPATCH_STATUS_REJECTED:
        return DispatchRejected(result.message)
    return DispatchOutcomeUnknown(result.message or "the worker answered no status")


def abort_to_proto(worker_request_id: str) -> worker_pb2.AbortRequest:
    return worker_pb2.AbortRequest(request_id=worker_request_id)
