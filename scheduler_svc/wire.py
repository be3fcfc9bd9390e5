"""Conversions between the scheduler's typed state and the protobuf messages of its APIs.

Worker events are decoded here into ``scheduler_svc.worker_report`` values (step kind as an enum),
so nothing past this module reads a ``StreamEventsResponse``.
"""

from __future__ import annotations

from common import wire
from common.proto.layerkv.v1 import admin_pb2, scheduler_pb2, types_pb2, worker_pb2
from common.store import RequestRecord
from common.wire import cost_model_to_proto, geometry_to_proto, sampling_to_proto
from scheduler_svc.ledger import WorkerBudget
from scheduler_svc.requests import FINISHED, RUNNING, WAITING, sampling_from_dict
from scheduler_svc.worker_pool import WorkerHandle
from scheduler_svc.worker_report import RunningInfo, StepInfo, StepKind, TierReport, WorkerReport

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


def tier_from_proto(usage: types_pb2.TierUsage) -> TierReport:
    return TierReport(usage.total_blocks, usage.free_blocks, tuple(usage.used_blocks_per_layer))


def step_kind_from_wire(kind: str) -> StepKind:
    """The step's kind; one this build does not know counts as idle (no timing to fit)."""
    try:
        return StepKind(kind)
    except ValueError:
        return StepKind.IDLE


def step_from_proto(step: worker_pb2.StepReport) -> StepInfo:
    return StepInfo(
        step=step.step,
        kind=step_kind_from_wire(step.kind),
        duration_s=step.duration_s,
        num_tokens=step.num_tokens,
        bytes_offloaded=step.bytes_offloaded,
        bytes_loaded=step.bytes_loaded,
        copy_wait_s=step.copy_wait_s,
        num_prefill_tokens=step.num_prefill_tokens,
        num_decode_requests=step.num_decode_requests,
        num_preemptions=step.num_preemptions,
        num_swapped_layers=step.num_swapped_layers,
    )


def worker_report_from_proto(event: worker_pb2.StreamEventsResponse) -> WorkerReport:
    """One worker event as typed values."""
    return WorkerReport(
        admitted=tuple(event.admitted_request_ids),
        finished=tuple(u.request_id for u in event.tokens if u.finished),
        running=tuple(
            RunningInfo(r.request_id, r.tokens_generated, r.decode_time_s, r.context_tokens, r.placement)
            for r in event.running
        ),
        waiting=tuple(event.waiting_request_ids),
        preempted=tuple(event.preempted_request_ids),
        gpu=tier_from_proto(event.gpu) if event.HasField("gpu") else None,
        host=tier_from_proto(event.host) if event.HasField("host") else None,
        step=step_from_proto(event.step) if event.HasField("step") else None,
    )
