"""Conversions between the scheduler's typed state and the protobuf messages of its APIs."""

from __future__ import annotations

import math

from common.errors import InvalidArgument
from common.proto.layerkv.v1 import admin_pb2, scheduler_pb2, types_pb2
from common.store import RequestRecord
from common.types import FinishReason, SamplingParams
from scheduler_svc.ledger import WorkerBudget
from scheduler_svc.requests import FINISHED, RUNNING, WAITING, sampling_from_dict
from scheduler_svc.worker_pool import WorkerHandle

FINISH_TO_PROTO = {
    FinishReason.STOP.value: types_pb2.FINISH_REASON_STOP,
    FinishReason.LENGTH.value: types_pb2.FINISH_REASON_LENGTH,
    FinishReason.ABORT.value: types_pb2.FINISH_REASON_ABORT,
    FinishReason.ERROR.value: types_pb2.FINISH_REASON_ERROR,
}
STATUS_TO_PROTO = {
    WAITING: scheduler_pb2.REQUEST_STATUS_WAITING,
    RUNNING: scheduler_pb2.REQUEST_STATUS_RUNNING,
    FINISHED: scheduler_pb2.REQUEST_STATUS_FINISHED,
}


def sampling_from_proto(p: types_pb2.SamplingParams, default_max_tokens: int) -> SamplingParams:
    """Wire sampling values → ``SamplingParams`` (0 means default); bad values → InvalidArgument."""
    for name, value in (("temperature", p.temperature), ("top_p", p.top_p)):
        if not math.isfinite(value):
            raise InvalidArgument(f"{name} must be a finite number, got {value}")
    return SamplingParams(
        max_tokens=p.max_tokens or default_max_tokens,
        temperature=float(p.temperature),
        top_p=float(p.top_p) if p.top_p else 1.0,
        top_k=int(p.top_k),
        seed=int(p.seed) if p.HasField("seed") else None,
        stop_token_ids=tuple(p.stop_token_ids),
        ignore_eos=p.ignore_eos,
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
        g, c = d.geometry, d.cost_model
        info.model = d.model
        info.geometry.CopyFrom(
            types_pb2.KvGeometry(
                num_layers=g.num_layers,
                num_kv_heads=g.num_kv_heads,
                head_dim=g.head_dim,
                block_size=g.block_size,
                dtype_bytes=g.dtype_bytes,
            )
        )
        model = handle.fitter.model() if handle.fitter is not None else c
        info.cost_model.CopyFrom(
            types_pb2.CostModel(
                d2h_bytes_per_s=model.d2h_bytes_per_s,
                h2d_bytes_per_s=model.h2d_bytes_per_s,
                prefill_base_s=model.prefill_base_s,
                prefill_per_token_s=model.prefill_per_token_s,
                prefill_per_token2_s=model.prefill_per_token2_s,
                decode_base_s=model.decode_base_s,
                decode_per_request_s=model.decode_per_request_s,
                decode_per_context_token_s=model.decode_per_context_token_s,
                correction=model.correction,
            )
        )
    if budget is not None:
        for report, target in ((budget.gpu, info.gpu), (budget.host, info.host)):
            target.CopyFrom(
                types_pb2.TierUsage(
                    total_blocks=report.total_blocks,
                    free_blocks=report.free_blocks,
                    used_blocks_per_layer=list(report.used_per_layer),
                )
            )
        info.reserved_gpu_blocks = budget.gpu_reserved
        info.reserved_host_blocks = budget.host_reserved
    return info
