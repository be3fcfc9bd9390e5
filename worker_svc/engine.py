"""The LayerKV engine: continuous batching of requests over a per-layer paged KV cache.

``add_request`` queues a request. Each ``step`` (vLLM v1's scheduling) first gives every request
holding blocks its tokens in admission order, within a token budget: one per decode, whose block
tables grow on demand, and a chunk of any unfinished prefill; when growth finds no room the most
recently admitted request is preempted (``worker_svc.preemption``). Then, if nothing was
preempted, waiting requests are admitted first-come first-served (blocks for the tokens to
prefill only, in the tiers their placement names) and get prefill chunks from what is left of the
budget. Everything scheduled runs as one packed forward; finished requests free their blocks.
Host layers are promoted back to GPU blocks when the GPU tier has room and nothing waits.
Synchronous; owned by one thread.
"""

from __future__ import annotations

import dataclasses
import itertools
import time
from collections import deque
from collections.abc import Sequence
from itertools import repeat
from operator import attrgetter

import torch

from common import kv_budget
from common.cost_profile import CostProfile
from common.errors import AlreadyExists, FailedPrecondition, InvalidArgument
from common.placement import interleaved, min_resident_layers, rule_placement
from common.tokenizer import Tokenizer
from common.types import FinishReason, KVGeometry, Placement, SamplingParams, TierCapacity
from worker_svc.attention import select_backend
from worker_svc.engine_config import EngineConfig, plan_inputs, reads_host_in_place
from worker_svc.kv.id_tensor import id_tensor
from worker_svc.kv.kv_cache import KVCache
from worker_svc.kv.manager import KVCacheManager
from worker_svc.kv.offload import CopyEngine, make_copy_engine
from worker_svc.kv.step_access import CopyStats, StepAccess
from worker_svc.kv.table_buffer import BlockTableBuffer
from worker_svc.memory_plan import ModelShape, device_free_bytes, plan_memory
from worker_svc.model.loader import LoadedModel, load_model, parse_dtype, weight_bytes
from worker_svc.outputs import KVUsage, RequestOutput, RunningState, StepOutput, StepStats
from worker_svc.preemption import Preemptor, StepCounts
from worker_svc.request import Request, RequestState
from worker_svc.sampling import make_batch_generator, make_generator, sample

__all__ = ["Engine", "EngineConfig"]

_state_of = attrgetter("state")


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise InvalidArgument("device 'cuda' was asked for, but CUDA is not available on this machine")
    return device


class Engine:
    def __init__(self, config: EngineConfig, loaded: LoadedModel, device: torch.device, dtype: torch.dtype,
                 copy_engine: CopyEngine | None = None) -> None:
        self.config = config
        self.device, self.dtype = device, dtype
        self.model = loaded.model
        self.model_config = loaded.config
        self.model_name = loaded.name
        self.tokenizer: Tokenizer = loaded.tokenizer
        self.eos_token_id = loaded.config.eos_token_id
        mc = loaded.config
        limit = mc.max_position_embeddings
        self.max_model_len = min(limit, config.max_model_len or limit)
        self.geometry = KVGeometry(mc.num_layers, mc.num_kv_heads, mc.head_dim, config.block_size,
                                   torch.tensor([], dtype=dtype).element_size())
        self.backend = select_backend(device, dtype, config.attention_backend)
        # On CPU the host tier is the compute device's own memory: host layers are read in place.
        self.host_in_place = reads_host_in_place(config, device.type)
        # Tiers from one typed plan: free memory minus weights, step buffers and a margin.
        weights = weight_bytes(mc, self.geometry.dtype_bytes)
        self.memory_plan = sizes = plan_memory(
            ModelShape(mc.vocab_size, mc.hidden_size, mc.intermediate_size, mc.num_heads,
                       mc.num_kv_heads, mc.head_dim),
            self.geometry, plan_inputs(config, self.max_model_len, weights, self.backend.name,
                                       self.host_in_place),
            device_free_bytes(device, weights))
        self.backend.max_gather_blocks = sizes.gather_blocks  # the workspace stays within its budget
        self.capacity = TierCapacity(sizes.gpu_blocks, sizes.host_blocks)
        self.kv = KVCache(self.geometry, sizes.gpu_blocks, sizes.staging_blocks, sizes.host_blocks,
                          device, dtype, self.host_in_place)
        self.kv_manager = KVCacheManager(self.geometry, sizes.gpu_blocks, sizes.host_blocks,
                                         sizes.staging_blocks, self.host_in_place)
        self.copy_engine = copy_engine or make_copy_engine(device)
        # persistent, updated by changes
        self.block_tables = BlockTableBuffer(mc.num_layers, device=device, host_offset=self.kv.host_offset)
        self._adopt(CostProfile())  # the defaults until profiled (below)
        self._waiting: deque[Request] = deque()  # no blocks; recompute-preempted ones at the front
        self._running: list[Request] = []  # holding blocks, in admission order
        self._admissions = itertools.count(1)
        self._preemptor = Preemptor(self)
        self._requests: dict[str, Request] = {}  # every request not yet reported finished
        self._aborted: list[Request] = []
        self._step = 0
        self._sampling_rng = make_batch_generator(device, config.seed)  # the unseeded requests' draws
        if config.profile != "off":
            from worker_svc.profiler import startup_profile

            self._adopt(startup_profile(self))

    @classmethod
    def from_config(cls, config: EngineConfig, copy_engine: CopyEngine | None = None) -> Engine:
        device = resolve_device(config.device)
        dtype_name = config.dtype
        if dtype_name == "auto":
            dtype_name = "bfloat16" if device.type == "cuda" else "float32"
        dtype = parse_dtype(dtype_name)
        return cls(config, load_model(config.model, device, dtype, config.seed), device, dtype, copy_engine)

    # ---- admission ---------------------------------------------------------------------------
    def validate(self, prompt_ids: Sequence[int], sampling: SamplingParams,
                 placement: Placement | None = None) -> None:
        if len(prompt_ids) == 0:
            raise InvalidArgument("prompt is empty: give at least one token")
        vocab = self.model_config.vocab_size
        bad = [t for t in prompt_ids if not 0 <= int(t) < vocab]
        if bad:
            raise InvalidArgument(f"prompt token ids {bad[:5]} are outside the vocabulary [0, {vocab})")
        total = len(prompt_ids) + sampling.max_tokens
        if total > self.max_model_len:
            raise InvalidArgument(f"prompt ({len(prompt_ids)} tokens) + max_tokens ({sampling.max_tokens}) "
                                  f"= {total} exceeds the model's context of {self.max_model_len} tokens")
        if placement is not None and placement.num_layers != self.geometry.num_layers:
            raise InvalidArgument(f"placement {placement} has {placement.num_layers} letters, "
                                  f"the model has {self.geometry.num_layers} layers")
        layers = self.geometry.num_layers
        candidates = [placement or Placement.all_gpu(layers)]
        if placement is None and self.config.default_placement != "all-gpu":
            fewest = min_resident_layers(len(prompt_ids), self.geometry, self.cost_model)
            # rule: exactly its placement; auto: any from all-GPU down to the rule's minimum
            most = fewest if self.config.default_placement == "rule" else layers
            candidates = [interleaved(layers, r) for r in range(most, fewest - 1, -1)]
        # The prompt and one block of growth: max_tokens bounds the output, it reserves nothing.
        tokens = len(prompt_ids) + min(sampling.max_tokens, self.geometry.block_size)
        why = None
        for check in candidates:
            why = self.kv_manager.could_ever_fit(tokens, check)
            if why is None:
                return
        raise InvalidArgument(f"request can never be admitted: it {why}")

    def placement_for(self, num_prompt_tokens: int, max_tokens: int,
                      placement: Placement | None) -> Placement | None:
        """The placement to admit with now, or ``None`` when the default rule finds no room.

        ``max_tokens`` is accepted for the callers' sake; nothing is reserved for the output."""
        if placement is not None:
            return placement
        layers = self.geometry.num_layers
        mode = self.config.default_placement
        if mode == "all-gpu":
            return Placement.all_gpu(layers)
        if mode == "rule":
            return rule_placement(num_prompt_tokens, self.geometry, self.cost_model)
        # auto: as many GPU layers as the GPU tier holds now (with the first token's growth), but
        # never fewer than the rule's minimum.
        per_layer = kv_budget.blocks_per_layer(self.geometry, num_prompt_tokens + 1)
        fit = min(layers, self.kv_manager.gpu.num_free // max(1, per_layer))
        if fit < min_resident_layers(num_prompt_tokens, self.geometry, self.cost_model):
            return None
        return interleaved(layers, fit)

    def can_admit(self, num_prompt_tokens: int, max_tokens: int, placement: Placement | None = None) -> bool:
        chosen = self.placement_for(num_prompt_tokens, max_tokens, placement)
        return chosen is not None and self.kv_manager.can_allocate(num_prompt_tokens, chosen)

    def add_request(self, request_id: str, prompt_ids: Sequence[int], sampling: SamplingParams,
                    placement: Placement | None = None, preemption: str = "") -> None:
        """Queue a request. ``preemption``: "recompute", "swap-layers" or "" (the engine's default)."""
        if request_id in self._requests:
            raise AlreadyExists(f"request id {request_id!r} is already in the engine")
        if preemption not in ("", "recompute", "swap-layers"):
            raise InvalidArgument(f"preemption {preemption!r} must be recompute, swap-layers or empty")
        self.validate(prompt_ids, sampling, placement)
        # Draws keyed by (seed, absolute position); unseeded requests draw together (sample's rng).
        gen = make_generator(sampling.seed, len(prompt_ids)) if sampling.seed is not None else None
        req = Request(request_id, [int(t) for t in prompt_ids], sampling, placement, gen,
                      time.perf_counter(), self.eos_token_id, preemption or self.config.preemption_mode)
        self._requests[request_id] = req
        self._waiting.append(req)

    def abort(self, request_id: str) -> bool:
        req = self._requests.get(request_id)
        if req is None or req.state is RequestState.FINISHED:
            return False
        self._finish(req, FinishReason.ABORT)
        self._aborted.append(req)
        return True

    def has_work(self) -> bool:
        return bool(self._requests) or bool(self._aborted) or self.kv_manager.copies_in_flight

    def usage(self) -> KVUsage:
        self.kv_manager.poll()
        return self.kv_manager.usage()

    def _finish(self, req: Request, reason: FinishReason) -> None:
        if req.state is RequestState.WAITING:
            self._waiting.remove(req)
        req.state, req.finish_reason = RequestState.FINISHED, reason
        if req.table is not None:
            self.kv_manager.release(req.request_id)
            req.table = None
            self._running.remove(req)

    def admits_immediately(self) -> bool:
        """Nothing queued and a free request slot: an ``add_request`` that fits is admitted at once."""
        return not self._waiting and len(self._running) < self.config.max_num_seqs

    def admit_waiting(self) -> list[str]:
        """Admit queued requests now (FCFS, as blocks allow) instead of at the next step; the ids
        returned here are not repeated in the next ``StepOutput.admitted``."""
        return [r.request_id for r in self._admit()]

    def _admit(self) -> list[Request]:
        admitted: list[Request] = []
        while self._waiting and len(self._running) < self.config.max_num_seqs:
            req = self._waiting[0]
            placement = self.placement_for(len(req.prompt_ids), req.sampling.max_tokens, req.placement)
            table = None if placement is None else self.kv_manager.allocate(
                req.request_id, req.num_tokens, placement)  # the prompt (+ output after a preemption)
            if table is None:
                break  # first come, first served: later requests wait behind the head
            self._waiting.popleft()
            req.table, req.state, req.num_computed = table, RequestState.ADMITTED, 0
            req.admit_seq = next(self._admissions)
            req.admitted_placement = table.letters
            self._running.append(req)
            admitted.append(req)
        return admitted

    # ---- the step ----------------------------------------------------------------------------
    def step(self) -> StepOutput:
        start = time.perf_counter()
        self._step += 1
        self.kv_manager.poll()
        outputs = [RequestOutput(r.request_id, (), (), True, FinishReason.ABORT) for r in self._aborted]
        for r in self._aborted:
            self._requests.pop(r.request_id, None)
        self._aborted = []
        stats = CopyStats()
        counts = StepCounts()
        self.kv_manager.staging.wait_s = 0.0
        started = [r for r in self._requests.values() if r.output_ids]  # T_past runs for these
        plan, admitted, failed, prefills, prefill_tokens = self._schedule(stats, counts)
        outputs += failed
        decodes = len(plan) - prefills
        kind = ("idle" if not plan else "decode" if not prefill_tokens
                else "prefill" if not decodes else "mixed")
        if plan:
            if not self._waiting:
                self._promote(stats)
            outputs += self._run(plan, stats, prefills == 0)
        duration = time.perf_counter() - start
        # T_past is wall time since the first token: a prefill chunk stalls every running request
        # too (and a preempted one waits), and the scheduler's TPOT slack must see that.
        for r in started:
            r.decode_time_s += duration
        self.kv_manager.poll()
        running = RequestState.RUNNING
        running_states = tuple([
            RunningState(r.request_id, len(r.output_ids), r.decode_time_s, r.num_computed + 1,
                         r.table.letters)  # type: ignore[union-attr]
            for r in self._running if r.state is running])
        step_stats = StepStats(self._step, kind, duration, prefill_tokens + decodes, stats.bytes_offloaded,
                               stats.bytes_loaded, stats.wait_s + self.kv_manager.staging.wait_s,
                               prefill_tokens, decodes, counts.preemptions, counts.swapped_layers)
        return StepOutput(tuple(outputs), tuple(r.request_id for r in admitted), running_states,
                          step_stats, self.kv_manager.usage(), tuple(counts.preempted),
                          tuple(r.request_id for r in self._waiting))

    def _schedule(self, stats: CopyStats, counts: StepCounts
                  ) -> tuple[list[tuple[Request, int]], list[Request], list[RequestOutput], int, int]:
        """(request, tokens to compute) of this step, the requests admitted, failures, and how many
        of the plan's requests are prefilling (the rest decode) with their tokens."""
        budget = self.config.max_num_batched_tokens
        prefill_left = self.config.max_prefill_tokens
        prefills = 0
        plan: list[tuple[Request, int]] = []
        failed: list[RequestOutput] = []
        admitted: list[Request] = []
        # Locals for the per-request loop (it runs for every request of every step). ``running``
        # is the list itself: admission and preemption change it in place.
        running, admitted_state, bs = self._running, RequestState.ADMITTED, self.geometry.block_size
        i = self._schedule_decodes(plan, failed, stats, counts) if budget >= len(running) else 0
        if i < 0:
            return plan, admitted, failed, 0, 0  # a request at a block boundary stopped the step
        budget -= i
        while budget > 0:
            if i == len(running):
                if counts.preemptions or admitted or not self._waiting:
                    break  # vLLM's rule: nothing is admitted in a step that had to preempt
                admitted = self._admit()
                if not admitted:
                    break
                continue
            r = running[i]
            done = r.num_computed
            n = min(len(r.prompt_ids) + len(r.output_ids) - done, budget)
            prefilling = r.state is admitted_state  # (growth never changes r's state: it is kept)
            if prefilling and n > prefill_left:
                n = prefill_left
            if n <= 0:
                i += 1
                continue
            table = r.table
            assert table is not None
            # Most decode steps stay inside the last block: no growth, no preemption check.
            if done + n > table.blocks_per_layer * bs:
                outcome = self._preemptor.make_room(r, done + n, stats, counts)
                if outcome is not None:  # r itself was preempted, or can never grow
                    if outcome.error:
                        self._requests.pop(r.request_id, None)
                        failed.append(outcome.error)
                    break
            plan.append((r, n))
            budget -= n
            if prefilling:
                prefill_left -= n
                prefills += 1
            i += 1
        return plan, admitted, failed, prefills, self.config.max_prefill_tokens - prefill_left

    def _schedule_decodes(self, plan: list[tuple[Request, int]], failed: list[RequestOutput],
                          stats: CopyStats, counts: StepCounts) -> int:
        """The general loop's work for the leading decoding requests of ``_running`` (RUNNING: one
        token each, every one within the budget), with the per-request checks as C-level passes
        and ``make_room`` only for the rows at a block boundary, in the same order: the plan gets
        the same entries. Returns where the general loop goes on (after a growth that preempted,
        the request after it), or -1 when a request that needed room was not scheduled (the
        general loop stops there too)."""
        running, decoding = self._running, RequestState.RUNNING
        states = list(map(_state_of, running))
        k = len(states) if states.count(decoding) == len(states) else next(
            j for j, s in enumerate(states) if s is not decoding)
        if not k:
            return 0
        bs = self.geometry.block_size
        # A decode computes token num_computed (the last one): growth when it starts a new block.
        at_boundary = [j for j, r in enumerate(running[:k])
                       if r.num_computed >= r.table.blocks_per_layer * bs]  # type: ignore[union-attr]
        if len(at_boundary) > 1 and self.kv_manager.grow_each_by_one(
                [running[j].table for j in at_boundary]):  # type: ignore[misc]
            at_boundary = []  # all grew, as make_room's growth of each in turn would have
        end = k
        for j in at_boundary:
            r = running[j]
            held, preemptions = len(running), counts.preemptions
            outcome = self._preemptor.make_room(r, r.num_computed + 1, stats, counts)
            if outcome is not None:  # r itself was preempted, or can never grow
                if outcome.error:
                    self._requests.pop(r.request_id, None)
                    failed.append(outcome.error)
                plan.extend(zip(running[:j], repeat(1)))
                return -1
            if len(running) != held or counts.preemptions != preemptions:
                end = j + 1  # newer requests were preempted or swapped: the general loop goes on
                break
        plan.extend(zip(running[:end], repeat(1)))
        return end

    def _promote(self, stats: CopyStats) -> None:
        if not self.kv_manager.has_host_reads or self.config.max_promotions_per_step <= 0:
            return  # nothing to promote (host layers read in place gain nothing from a promotion)
        # Keep a block of growth per GPU-read layer of every request that will still grow, so a
        # promotion does not take the room the next decode grows into (and preempt to get it back).
        growing = {r.request_id for r in self._running if r.table is not None and r.table.blocks_per_layer
                   < kv_budget.blocks_per_layer(self.geometry, len(r.prompt_ids) + r.sampling.max_tokens - 1)}
        keep = sum(lb.reads_gpu_blocks for r in self._running if r.request_id in growing
                   for lb in r.table.layers)  # type: ignore[union-attr]
        budget = self.config.max_promotions_per_step
        decoding = {r.request_id for r in self._running if r.state is RequestState.RUNNING}
        for table, layer in self.kv_manager.promotable(decoding):
            if budget <= 0:
                break
            moved = self.kv_manager.start_promotion(table, layer, self.copy_engine, self.kv.gpu, self.kv.host,
                                                    keep_free=keep + (table.request_id in growing))
            if moved < 0:
                break  # the GPU tier is full
            stats.loaded(table.request_id, moved)
            budget -= 1

    def _run(self, plan: list[tuple[Request, int]], stats: CopyStats,
             decodes_only: bool = False) -> list[RequestOutput]:
        batch = [r for r, _ in plan]
        tables = [r.table for r in batch]
        assert all(t is not None for t in tables)
        starts = [r.num_computed for r in batch]
        lens = [n for _, n in plan]
        if len(lens) == sum(lens):  # one token each (decodes): no per-request slicing or ranges
            ids = [r.prompt_ids[s] if s < len(r.prompt_ids) else r.output_ids[s - len(r.prompt_ids)]
                   for r, s in zip(batch, starts, strict=True)]
            positions = starts
            ends = list(range(1, len(lens) + 1))
        else:
            ids = [t for r, s, n in zip(batch, starts, lens, strict=True) for t in r.token_at(s, s + n)]
            positions = [p for s, n in zip(starts, lens, strict=True) for p in range(s, s + n)]
            ends = list(itertools.accumulate(lens))
        # Requests whose sequence is computed after this step sample their next token.
        # (A decode-only step: a running request has every token but its last computed, so all do.)
        assert not decodes_only or len(lens) == sum(lens), "a decode computes one token"
        sampled = list(range(len(batch))) if decodes_only else [
            i for i, (r, s, n) in enumerate(zip(batch, starts, lens, strict=True))
            if s + n == len(r.prompt_ids) + len(r.output_ids)]
        every = len(sampled) == len(batch)  # (a decode step): rows and outputs map one to one
        access: StepAccess | None = None
        try:
            access = StepAccess(tables, starts, lens, self.kv, self.kv_manager,  # type: ignore[arg-type]
                                self.copy_engine, stats, self.block_tables)
            dev = self.device
            last = [e - 1 for e in ends] if every else [ends[i] - 1 for i in sampled]
            logits = self.model(id_tensor(ids).to(dev), id_tensor(positions).to(dev),
                                id_tensor(last).to(dev), access, self.backend)
            to_sample = batch if every else [batch[i] for i in sampled]
            tokens = sample(logits, [r.sampling for r in to_sample], [r.generator for r in to_sample],
                            self._sampling_rng) if sampled else []
        except Exception as exc:  # a failed forward fails its batch, never the engine
            if access is not None:
                access.abandon()
            outputs = []
            for r in batch:
                self._finish(r, FinishReason.ERROR)
                self._requests.pop(r.request_id, None)
                outputs.append(RequestOutput(r.request_id, (), (), True, FinishReason.ERROR,
                                             error=f"{type(exc).__name__}: {exc}"))
            return outputs
        now = time.perf_counter()
        assert access is not None
        if access.copies_staged:
            staged_in, staged_out = access.copied_bytes()
            for (r, n), loaded, stored in zip(plan, staged_in, staged_out, strict=True):
                r.num_computed += n
                r.table.num_tokens = r.num_computed  # type: ignore[union-attr]
                if loaded or stored:  # this step's staging copies
                    r.bytes_loaded += loaded
                    r.bytes_offloaded += stored
        else:  # no layer went through staging: progress only
            for r, n in plan:
                r.num_computed += n
                r.table.num_tokens = r.num_computed  # type: ignore[union-attr]
        for r in batch if stats.loaded_by_request or stats.offloaded_by_request else ():
            # promotions and swap-outs, counted per request (rare)
            r.bytes_offloaded += stats.offloaded_by_request.get(r.request_id, 0)
            r.bytes_loaded += stats.loaded_by_request.get(r.request_id, 0)
        outputs = []
        emit = outputs.append
        running = RequestState.RUNNING
        for r, tok in zip(to_sample, tokens, strict=True):
            token_id, logprob = tok.token_id, tok.logprob
            if r.first_token_s is None:
                r.first_token_s = now
            r.state = running
            reason = r.append(token_id, logprob)
            if reason is not None:
                self._finish(r, reason)
                self._requests.pop(r.request_id, None)
            emit(RequestOutput(  # positional: keywords cost a frozen dataclass more, per request
                r.request_id, (token_id,), (logprob,), reason is not None, reason, None,
                r.admitted_placement, r.bytes_offloaded, r.bytes_loaded))
            r.bytes_offloaded = r.bytes_loaded = 0
        return outputs

    def profile(self) -> CostProfile:
        """Re-measure the cost model and use it from now on; ``FailedPrecondition`` unless idle."""
        from worker_svc.profiler import measure_profile

        if self.has_work():
            raise FailedPrecondition(
                f"the worker is not idle (it holds {len(self._requests)} requests): a profile measures an "
                "idle engine; drain the worker and retry once its requests have finished")
        self._adopt(measure_profile(self))
        return self.cost_profile

    def _adopt(self, profile: CostProfile) -> None:
        """Advertise ``profile``, marked with how this engine reads host layers (a saved profile
        does not decide that: the engine's configuration does)."""
        cost = dataclasses.replace(profile.cost_model, host_in_place=self.host_in_place)
        self.cost_profile = dataclasses.replace(profile, cost_model=cost)
        self.cost_model = cost
