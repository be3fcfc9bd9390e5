"""The ``layerkv`` policy: layer-wise placement plus SLO-aware admission (arXiv 2410.00428 §3).

For each waiting request and each worker it computes a layer placement for the *prompt* (the
paper's minimum resident layers, interleaved, shrunk to the worker's free GPU blocks when they run
short as long as host and staging blocks suffice) and admits the request only while every request
running on that worker keeps its TPOT SLO: ``slack_i = SLO_i·(N_past + N_future) − T_past −
N_future·t_step`` must cover the predicted prefill time admitted to that worker in this round,
charged as the worker runs it: in chunks of its ``max_num_batched_tokens`` (less one token per
running decode), each chunk step stalling every running decode. Decode grows on demand; the ledger
keeps ``headroom_blocks`` per layer of growth free for each request, and when growth still fails
the worker preempts by ``swap-layers`` (GPU layers move to the host, the request keeps decoding).
Among the workers that pass, the one with the lowest predicted TTFT wins. The running mean of
output lengths is soft state: it only sharpens the prediction and the decisions stay valid
without it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import ClassVar, Literal

from pydantic import Field

from common import kv_budget
from common.types import Placement
from scheduler_svc.policies.base import (
    Dispatch,
    FleetSnapshot,
    Policy,
    PolicyParams,
    PreemptionMode,
    PrefillInFlight,
    RunningRequest,
    WaitingRequest,
    WorkerSnapshot,
)
from scheduler_svc.policies.layerkv_placement import chunk_tokens, placement_for, predicted_prefill_s


class LayerKVParams(PolicyParams):
    """Parameters of the ``layerkv`` policy."""

    slack_gate: bool = Field(
        default=True,
        description="admit only while every protected request keeps its TPOT slack and the "
        "newcomer's own TPOT fits (False: placement and budget only, the gate's ablation)",
    )
    output_prediction: Literal["mean", "max_tokens"] = Field(
        default="mean",
        description="output length of a request: the running mean of finished requests' output "
        "lengths (max_tokens until the first one finishes) or its max_tokens (an upper bound: "
        "the slack is large and the gate rarely binds); capped by max_tokens either way",
    )
    use_output_hint: bool = Field(
        default=True,
        description="a request's own expected_output_tokens, when the client gives one, replaces "
        "the prediction (capped by max_tokens)",
    )
    newcomer_tpot_check: bool = Field(
        default=True,
        description="also refuse a request whose own predicted TPOT (the decode step with it "
        "added, its host layers streamed host-to-device every step) exceeds its TPOT SLO, unless "
        "the worker is idle (nothing better will come); a placement with more GPU layers is "
        "tried first",
    )
    queue_order: Literal["fcfs", "ttft-deadline"] = Field(
        default="fcfs", description="order of the waiting queue: arrival, or earliest TTFT deadline first"
    )
    prefill_safety: float = Field(
        default=1.2, ge=1.0, le=10.0, description="predicted prefill times are multiplied by this"
    )
    slack_reserve_s: float = Field(
        default=0.0, ge=0.0, description="seconds of every running request's slack never given to prefills"
    )
    default_ttft_slo_s: float = Field(default=10.0, gt=0.0, description="TTFT SLO of requests without one")
    default_tpot_slo_s: float = Field(default=0.5, gt=0.0, description="TPOT SLO of requests without one")
    max_prefill_tokens_per_round: int = Field(
        default=16384,
        ge=1,
        description="prompt tokens admitted to one worker per round (the first request always may go)",
    )
    skip_blocked: bool = Field(
        default=False,
        description="let later requests overtake one that fits no worker now (False: strict queue order)",
    )
    headroom_blocks: int = Field(
        default=1,
        ge=0,
        le=1 << 16,
        description="decode growth per layer the ledger keeps free for each request beyond the "
        "blocks it holds, in blocks (never past prompt + max_tokens); 0 is vLLM's rule, a "
        "large value reserves the whole request",
    )
    preemption: PreemptionMode = Field(
        default=PreemptionMode.SWAP_LAYERS,
        description="what the worker does when a request cannot grow: 'swap-layers' (GPU layers "
        "to the host, keep decoding), 'recompute' (vLLM v1) or '' (the worker's default)",
    )
    protect_lost_requests: bool = Field(
        default=False,
        description="also protect running requests whose own slack (before this round and before "
        "the prefills in flight) is already below slack_reserve_s: False, they miss their SLO "
        "whatever is admitted and blocking admission for them would only add TTFT misses (they "
        "still count in the decode step); True, no prefill is admitted while one runs",
    )


@dataclass(frozen=True)
class _Protected:
    """A request whose TPOT SLO admission keeps, and the prefill time that runs before it decodes."""

    request: RunningRequest
    # Prefill seconds (before the safety factor) of the worker's queue that run before its own
    # first token: they do not stall it. 0 for a request already decoding.
    ahead_s: float = 0.0


@dataclass
class _WorkerRound:
    """What the prefills in flight and this round's proposals already took from one worker."""

    gpu_free: int
    host_free: int
    host_demand: list[int]  # host-placed blocks per layer: the staging blocks they stream through
    prefill_s: float = 0.0  # predicted prefill in flight or admitted this round (before the safety factor)
    prompt_tokens: int = 0  # admitted this round
    added: int = 0  # requests admitted this round
    extra_batch: int = 0  # decodes to come beyond the running ones: in flight and this round's
    extra_context: int = 0
    extra_h2d_bytes: int = 0  # per decode step, for their host-placed layers
    protected: list[_Protected] = field(default_factory=list)


@dataclass(frozen=True)
class _Candidate:
    """A feasible placement of one request on one worker, with its predicted cost."""

    worker: WorkerSnapshot
    placement: Placement
    prefill_s: float  # predicted, including any offload the prefill cannot hide
    ttft_s: float  # predicted from now: the worker's queued prefills (in flight, this round's) plus this one


class LayerKVPolicy(Policy):
    name: ClassVar[str] = "layerkv"
    description: ClassVar[str] = (
        "LayerKV: minimum GPU-resident layers (interleaved), admission while every running "
        "request keeps its TPOT SLO, worker with the best predicted TTFT"
    )
    Params: ClassVar[type[PolicyParams]] = LayerKVParams

    def __init__(self, params: PolicyParams | None = None) -> None:
        super().__init__(params)
        assert isinstance(self.params, LayerKVParams), f"layerkv takes LayerKVParams, got {type(self.params)}"
        self.p: LayerKVParams = self.params
        # Soft state for output_prediction="mean": last seen tokens of running requests, and the
        # running mean of the output lengths of those that finished.
        self._last_seen: dict[str, int] = {}
        self._finished_outputs = 0
        self._mean_output = 0.0

    # ---- the round ---------------------------------------------------------------------------

    def schedule(self, fleet: FleetSnapshot) -> Sequence[Dispatch]:
        self._observe_finished(fleet)
        rounds = {w.worker_id: self._round_of(w) for w in fleet.workers if w.accepting}
        dispatches: list[Dispatch] = []
        for req in self._ordered(fleet.waiting):
            best: _Candidate | None = None
            for worker in fleet.workers:
                if worker.worker_id not in rounds:
                    continue
                cand = self._candidate(req, worker, rounds[worker.worker_id])
                if cand is not None and (best is None or _better(cand, best, rounds)):
                    best = cand
            if best is None:
                if self.p.skip_blocked or not self._ever_fits(req, fleet):
                    continue  # a request no empty worker could hold must not block the queue forever
                break  # strict order: nobody overtakes the head of the queue
            self._take(req, best, rounds[best.worker.worker_id])
            dispatches.append(
                Dispatch(
                    req.request_id,
                    best.worker.worker_id,
                    best.placement,
                    headroom_tokens=self.headroom_tokens(req, best.worker),
                    preemption=self.p.preemption,
                )
            )
        return dispatches

    def _round_of(self, worker: WorkerSnapshot) -> _WorkerRound:
        """The worker's round state before any proposal: its running requests and, charged once,
        the prefills dispatched to it that it has not reported running yet."""
        rnd = _WorkerRound(
            worker.gpu_blocks_free,  # the ledger already subtracted the in-flight reservations
            worker.host_blocks_free,
            list(worker.host_used_per_layer) or [0] * worker.geometry.num_layers,
            protected=self._protected(worker),
        )
        chunk = self.chunk_tokens(worker)
        for f in worker.prefilling:  # oldest first: the worker prefills them in that order
            rnd.prefill_s += self.predicted_prefill_s(f.num_prompt_tokens, f.placement, worker, chunk)
            self._add_decode(rnd, worker, f.num_prompt_tokens, f.placement)
            rnd.protected.append(_Protected(_as_running(f), ahead_s=rnd.prefill_s))
        return rnd

    def _ever_fits(self, req: WaitingRequest, fleet: FleetSnapshot) -> bool:
        """Whether some accepting worker could take ``req`` once it is empty."""
        return any(
            req.num_prompt_tokens + req.max_tokens <= w.max_model_len
            and self.placement_for(
                req.num_prompt_tokens,
                self.headroom_tokens(req, w),
                w,
                w.gpu_blocks_total,
                w.host_blocks_total,
            )
            is not None
            for w in fleet.workers
            if w.accepting
        )

    def _ordered(self, waiting: Sequence[WaitingRequest]) -> list[WaitingRequest]:
        if self.p.queue_order == "fcfs":
            return sorted(waiting, key=lambda r: r.arrival_time)
        return sorted(waiting, key=lambda r: (r.arrival_time + self._ttft_slo(r), r.arrival_time))

    # ---- one request on one worker -----------------------------------------------------------

    def _candidate(self, req: WaitingRequest, worker: WorkerSnapshot, rnd: _WorkerRound) -> _Candidate | None:
        """The request's placement and predicted cost on this worker, or None when it may not go."""
        if req.num_prompt_tokens + req.max_tokens > worker.max_model_len or worker.requests_preempted:
            return None  # too long, or the worker re-admits its preempted requests first
        if rnd.added and rnd.prompt_tokens + req.num_prompt_tokens > self.p.max_prefill_tokens_per_round:
            return None
        placement = self._placement(req, worker, rnd)
        if placement is None:
            return None
        gate_newcomer = self.p.slack_gate and self.p.newcomer_tpot_check
        if gate_newcomer and not self._newcomer_keeps(req, placement, worker, rnd):
            if placement.gpu_layers == worker.geometry.num_layers:
                return None
            # Streaming its host layers every step makes its own decode too slow: try the most GPU
            # layers the free blocks hold.
            placement = self._placement(req, worker, rnd, min_gpu_layers=worker.geometry.num_layers)
            if placement is None or not self._newcomer_keeps(req, placement, worker, rnd):
                return None
        prefill_s = self.predicted_prefill_s(
            req.num_prompt_tokens, placement, worker, self.chunk_tokens(worker)
        )
        if self.p.slack_gate and not self._slo_keeps(req, placement, prefill_s, worker, rnd):
            return None
        return _Candidate(worker, placement, prefill_s, rnd.prefill_s + prefill_s)

    def _placement(
        self, req: WaitingRequest, worker: WorkerSnapshot, rnd: _WorkerRound, min_gpu_layers: int = 0
    ) -> Placement | None:
        return self.placement_for(
            req.num_prompt_tokens,
            self.headroom_tokens(req, worker),
            worker,
            rnd.gpu_free,
            rnd.host_free,
            rnd.host_demand,
            min_gpu_layers,
        )

    def headroom_tokens(self, req: WaitingRequest, worker: WorkerSnapshot) -> int:
        """Growth the ledger keeps free for ``req``: ``headroom_blocks`` per layer, within max_tokens."""
        return min(req.max_tokens, self.p.headroom_blocks * worker.geometry.block_size)

    # the placement and the prefill charge (scheduler_svc.policies.layerkv_placement)
    chunk_tokens = staticmethod(chunk_tokens)
    placement_for = staticmethod(placement_for)
    predicted_prefill_s = staticmethod(predicted_prefill_s)

    def _slo_keeps(
        self,
        req: WaitingRequest,
        placement: Placement,
        prefill_s: float,
        worker: WorkerSnapshot,
        rnd: _WorkerRound,
    ) -> bool:
        """Whether every protected request keeps a non-negative slack after admitting ``req``.

        Each one is stalled by every prefill queued on the worker after its own first token: the
        prefills in flight and this round's, ``req``'s included, each chunk step of them.
        """
        if not rnd.protected:
            return True
        t_step = self._step_s(worker, rnd, extra=(req.num_prompt_tokens, placement))
        queued_s = rnd.prefill_s + prefill_s
        return all(
            self._slack_s(p.request, t_step)
            >= self.p.prefill_safety * (queued_s - p.ahead_s) + self.p.slack_reserve_s
            for p in rnd.protected
        )

    def _newcomer_keeps(
        self, req: WaitingRequest, placement: Placement, worker: WorkerSnapshot, rnd: _WorkerRound
    ) -> bool:
        """Whether ``req``'s own predicted TPOT, the decode step with it added (its host layers
        streamed in every step), stays within its TPOT SLO. An idle worker always passes: its
        step will never be shorter, and refusing would starve the request there."""
        if not worker.running and not worker.prefilling and not rnd.added:
            return True
        t_step = self._step_s(worker, rnd, extra=(req.num_prompt_tokens, placement))
        return t_step <= self._tpot_slo(req.tpot_slo_s)

    def _protected(self, worker: WorkerSnapshot) -> list[_Protected]:
        """Running requests whose TPOT SLO admission must keep (all, or those not already lost).

        "Lost" is judged on the request's own T_past and the current step, before the prefills in
        flight: a prefill charged to it must never be what lets the next admission ignore it.
        """
        if self.p.protect_lost_requests:
            return [_Protected(r) for r in worker.running]
        t_step = self._step_s(worker, _WorkerRound(0, 0, []))
        return [
            _Protected(r) for r in worker.running if self._slack_s(r, t_step) - self.p.slack_reserve_s >= 0.0
        ]

    def _slack_s(self, r: RunningRequest, t_step: float) -> float:
        """Decode time the request can still give away and keep its TPOT SLO.

        TPOT is measured over the gaps after the first token: with ``N`` tokens in all (generated
        plus predicted), the budget is ``SLO·(N − 1)``, of which ``T_past`` is spent and every
        future decode step takes ``t_step`` (the paper's ``SLO·(N_past + N_future) − T_past −
        N_future·t_step``, counting gaps rather than tokens).
        """
        slo = self._tpot_slo(r.tpot_slo_s)
        future = self._remaining_tokens(r.max_tokens, r.tokens_generated, r.expected_output_tokens)
        gaps = max(r.tokens_generated + future - 1, 0)
        steps = future if r.tokens_generated else max(future - 1, 0)  # its first token is the prefill's
        return slo * gaps - r.decode_time_s - steps * t_step

    def _step_s(
        self, worker: WorkerSnapshot, rnd: _WorkerRound, extra: tuple[int, Placement] | None = None
    ) -> float:
        """Predicted decode step on this worker with its running requests, those in flight, this
        round's and ``extra``, each host-placed layer streamed host-to-device every step."""
        geometry = worker.geometry
        batch = len(worker.running) + rnd.extra_batch
        context = rnd.extra_context
        h2d = rnd.extra_h2d_bytes
        for r in worker.running:
            ctx = r.num_prompt_tokens + r.tokens_generated
            context += ctx
            h2d += r.placement.host_layers * geometry.bytes_per_layer(ctx)
        if extra is not None:
            tokens, placement = extra
            batch += 1
            context += tokens
            h2d += placement.host_layers * geometry.bytes_per_layer(tokens)
        return worker.cost_model.decode_step_s(batch, context, h2d)

    @staticmethod
    def _add_decode(rnd: _WorkerRound, worker: WorkerSnapshot, tokens: int, placement: Placement) -> None:
        rnd.extra_batch += 1
        rnd.extra_context += tokens
        rnd.extra_h2d_bytes += placement.host_layers * worker.geometry.bytes_per_layer(tokens)

    def _take(self, req: WaitingRequest, cand: _Candidate, rnd: _WorkerRound) -> None:
        tokens = req.num_prompt_tokens + self.headroom_tokens(req, cand.worker)
        need = kv_budget.demand(cand.worker.geometry, tokens, cand.placement)
        rnd.gpu_free -= need.gpu_blocks
        rnd.host_free -= need.host_blocks
        rnd.host_demand = [a + b for a, b in zip(rnd.host_demand, need.host_per_layer, strict=True)]
        rnd.prefill_s += cand.prefill_s
        rnd.prompt_tokens += req.num_prompt_tokens
        rnd.added += 1
        self._add_decode(rnd, cand.worker, req.num_prompt_tokens, cand.placement)
        # From now on it is one more decode whose TPOT the round's later admissions must keep.
        as_running = RunningRequest(
            req.request_id,
            req.num_prompt_tokens,
            req.max_tokens,
            0,
            0.0,
            req.tpot_slo_s,
            cand.placement,
            req.expected_output_tokens,
        )
        rnd.protected.append(_Protected(as_running, ahead_s=rnd.prefill_s))

    # ---- predictions -------------------------------------------------------------------------

    def _ttft_slo(self, req: WaitingRequest) -> float:
        return req.ttft_slo_s if req.ttft_slo_s is not None else self.p.default_ttft_slo_s

    def _tpot_slo(self, own: float | None) -> float:
        return own if own is not None else self.p.default_tpot_slo_s

    def _remaining_tokens(self, max_tokens: int, generated: int, hint: int | None) -> int:
        """Predicted output tokens still to come (at least one while any may come)."""
        upper = max(max_tokens - generated, 0)
        if self.p.use_output_hint and hint is not None and hint > 0:
            expected: float = hint
        elif self.p.output_prediction == "max_tokens" or self._finished_outputs == 0:
            return upper
        else:
            expected = self._mean_output
        return min(upper, max(1, round(expected - generated)))

    def _observe_finished(self, fleet: FleetSnapshot) -> None:
        """Update the running mean of output lengths with the requests that left every worker."""
        seen = {r.request_id: r.tokens_generated for w in fleet.workers for r in w.running}
        waiting = {r.request_id for r in fleet.waiting}
        for request_id, tokens in self._last_seen.items():
            if request_id not in seen and request_id not in waiting:  # finished (requeued ones wait)
                self._finished_outputs += 1
                self._mean_output += (tokens - self._mean_output) / self._finished_outputs
        self._last_seen = seen

    @property
    def mean_output_tokens(self) -> float | None:
        """Running mean of finished requests' output lengths (None before the first one)."""
        return self._mean_output if self._finished_outputs else None


def _better(a: _Candidate, b: _Candidate, rounds: dict[str, _WorkerRound]) -> bool:
    """Lower predicted TTFT wins; ties go to the worker with more free GPU blocks left."""
    if a.ttft_s != b.ttft_s:
        return a.ttft_s < b.ttft_s
    return rounds[a.worker.worker_id].gpu_free > rounds[b.worker.worker_id].gpu_free


def _as_running(f: PrefillInFlight) -> RunningRequest:
    """A prefill in flight as the decode it becomes: nothing generated, no decode time yet."""
    return RunningRequest(
        f.request_id,
        f.num_prompt_tokens,
        f.max_tokens,
        0,
        0.0,
        f.tpot_slo_s,
        f.placement,
        f.expected_output_tokens,
    )
