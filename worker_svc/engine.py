"""The LayerKV engine: continuous batching of requests over a per-layer paged KV cache.

``add_request`` queues a request; each ``step`` admits waiting requests first-come first-served as
blocks allow (reserving every layer's blocks for prompt + max_tokens, in the tier its placement
names), then runs either one prefill of the admitted prompts packed together or one decode of all
running requests, samples, and frees the blocks of finished requests. In decode steps host layers
are promoted back to GPU blocks when the GPU tier has room and nothing waits. Synchronous; owned by
one thread.
"""

from __future__ import annotations

import itertools
import time
from collections import deque
from collections.abc import Sequence

import torch

from common.errors import AlreadyExists, InvalidArgument
from common.placement import interleaved, min_resident_layers, rule_placement
from common.tokenizer import Tokenizer
from common.types import CostModel, FinishReason, KVGeometry, Placement, SamplingParams, TierCapacity
from worker_svc.attention import select_backend
from worker_svc.engine_config import EngineConfig, size_tiers
from worker_svc.kv.kv_cache import KVCache
from worker_svc.kv.manager import KVCacheManager
from worker_svc.kv.offload import CopyEngine, make_copy_engine
from worker_svc.kv.step_access import CopyStats, DecodeAccess, PrefillAccess
from worker_svc.model.loader import LoadedModel, load_model, parse_dtype
from worker_svc.outputs import KVUsage, RequestOutput, RunningState, StepOutput, StepStats
from worker_svc.request import Request, RequestState
from worker_svc.sampling import make_generator, sample

__all__ = ["Engine", "EngineConfig"]


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
        free = torch.cuda.mem_get_info(device)[0] if device.type == "cuda" else None
        activation = config.max_prefill_tokens * (4 * mc.hidden_size + 3 * mc.intermediate_size) * 4
        sizes = size_tiers(config, self.geometry.bytes_per_block,
                           self.geometry.blocks_for(self.max_model_len), mc.num_layers, free,
                           activation + mc.vocab_size * config.max_num_seqs * 8)
        self.capacity = TierCapacity(sizes.gpu_blocks, sizes.host_blocks)
        self.kv = KVCache(self.geometry, sizes.gpu_blocks, sizes.staging_blocks, sizes.host_blocks,
                          device, dtype)
        self.kv_manager = KVCacheManager(self.geometry, sizes.gpu_blocks, sizes.host_blocks,
                                         sizes.staging_blocks)
        self.copy_engine = copy_engine or make_copy_engine(device)
        self.backend = select_backend(device, dtype, config.attention_backend)
        self.cost_model = CostModel()
        self._waiting: deque[Request] = deque()
        self._requests: dict[str, Request] = {}  # every request not yet reported finished
        self._aborted: list[Request] = []
        self._step = 0
        self._seeds = itertools.count(config.seed * 1_000_003 + 1)
        if config.profile:
            from worker_svc.profiler import profile_cost_model

            self.cost_model = profile_cost_model(self)

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
        check = placement or Placement.all_gpu(self.geometry.num_layers)
        if placement is None and self.config.default_placement != "all-gpu":
            check = interleaved(self.geometry.num_layers,
                                min_resident_layers(len(prompt_ids), self.geometry, self.cost_model))
        why = self.kv_manager.could_ever_fit(total, check)
        if why is not None:
            raise InvalidArgument(f"request can never be admitted: it {why}")

    def placement_for(self, num_prompt_tokens: int, max_tokens: int,
                      placement: Placement | None) -> Placement | None:
        """The placement to admit with now, or ``None`` when the default rule finds no room."""
        if placement is not None:
            return placement
        layers = self.geometry.num_layers
        mode = self.config.default_placement
        if mode == "all-gpu":
            return Placement.all_gpu(layers)
        if mode == "rule":
            return rule_placement(num_prompt_tokens, self.geometry, self.cost_model)
        # auto: as many GPU layers as the GPU tier holds now, but never fewer than the rule's minimum.
        per_layer = self.geometry.blocks_for(num_prompt_tokens + max_tokens)
        fit = min(layers, self.kv_manager.gpu.num_free // max(1, per_layer))
        if fit < min_resident_layers(num_prompt_tokens, self.geometry, self.cost_model):
            return None
        return interleaved(layers, fit)

    def can_admit(self, num_prompt_tokens: int, max_tokens: int, placement: Placement | None = None) -> bool:
        chosen = self.placement_for(num_prompt_tokens, max_tokens, placement)
        return chosen is not None and self.kv_manager.can_allocate(num_prompt_tokens + max_tokens, chosen)

    def add_request(self, request_id: str, prompt_ids: Sequence[int], sampling: SamplingParams,
                    placement: Placement | None = None) -> None:
        if request_id in self._requests:
            raise AlreadyExists(f"request id {request_id!r} is already in the engine")
        self.validate(prompt_ids, sampling, placement)
        seed = sampling.seed if sampling.seed is not None else next(self._seeds)
        gen = make_generator(seed, len(prompt_ids))  # draws keyed by (seed, absolute position)
        req = Request(request_id, [int(t) for t in prompt_ids], sampling, placement, gen,
                      time.perf_counter(), self.eos_token_id)
        self._requests[request_id] = req
        self._waiting.append(req)

    def abort(self, request_id: str) -> bool:
        req = self._requests.get(request_id)
        if req is None or req.state is RequestState.FINISHED:
            return False
        if req.state is RequestState.WAITING:
            self._waiting.remove(req)
        self._finish(req, FinishReason.ABORT)
        self._aborted.append(req)
        return True

    def has_work(self) -> bool:
        return bool(self._requests) or bool(self._aborted) or self.kv_manager.copies_in_flight

    def usage(self) -> KVUsage:
        self.kv_manager.poll()
        return self.kv_manager.usage()

    def _finish(self, req: Request, reason: FinishReason) -> None:
        req.state, req.finish_reason = RequestState.FINISHED, reason
        if req.table is not None:
            self.kv_manager.release(req.request_id)
            req.table = None

    def admits_immediately(self) -> bool:
        """Nothing queued and a free request slot: an ``add_request`` that fits is admitted at once."""
        holding = sum(r.table is not None for r in self._requests.values())
        return not self._waiting and holding < self.config.max_num_seqs

    def admit_waiting(self) -> list[str]:
        """Admit queued requests now (FCFS, as blocks allow) instead of at the next step; the ids
        returned here are not repeated in the next ``StepOutput.admitted``."""
        return self._admit()

    def _admit(self) -> list[str]:
        admitted: list[str] = []
        holding = sum(r.table is not None for r in self._requests.values())
        while self._waiting and holding < self.config.max_num_seqs:
            req = self._waiting[0]
            placement = self.placement_for(len(req.prompt_ids), req.sampling.max_tokens, req.placement)
            table = None if placement is None else self.kv_manager.allocate(
                req.request_id, req.reserved_tokens, placement)
            if table is None:
                break  # first come, first served: later requests wait behind the head
            self._waiting.popleft()
            req.table, req.state = table, RequestState.ADMITTED
            req.admitted_placement = table.letters
            admitted.append(req.request_id)
            holding += 1
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
        admitted = self._admit()  # requests admitted by admit_waiting() were reported to its caller
        stats = CopyStats()
        self.kv_manager.staging.wait_s = 0.0
        prefill = [r for r in self._requests.values() if r.state is RequestState.ADMITTED]
        running = [r for r in self._requests.values() if r.state is RequestState.RUNNING]
        kind, num_tokens = "idle", 0
        if prefill:
            batch: list[Request] = []
            budget = self.config.max_prefill_tokens
            for r in prefill:
                if batch and len(r.prompt_ids) > budget:
                    break
                batch.append(r)
                budget -= len(r.prompt_ids)
            kind, num_tokens = "prefill", sum(len(r.prompt_ids) for r in batch)
            outputs += self._run(batch, prefill=True, stats=stats)
        elif running:
            if not self._waiting:
                self._promote(stats)
            kind, num_tokens = "decode", len(running)
            outputs += self._run(running, prefill=False, stats=stats)
        duration = time.perf_counter() - start
        # T_past is wall time since the first token: a prefill step stalls every running request
        # too, and the scheduler's TPOT slack must see that stall.
        for r in running:
            r.decode_time_s += duration
        self.kv_manager.poll()
        live = [r for r in self._requests.values() if r.state is RequestState.RUNNING and r.table is not None]
        running_states = tuple(
            RunningState(r.request_id, len(r.output_ids), r.decode_time_s, r.context_tokens + 1,
                         r.table.letters)  # type: ignore[union-attr]
            for r in live)
        step_stats = StepStats(self._step, kind, duration, num_tokens, stats.bytes_offloaded,
                               stats.bytes_loaded, stats.wait_s + self.kv_manager.staging.wait_s)
        return StepOutput(tuple(outputs), tuple(admitted), running_states, step_stats,
                          self.kv_manager.usage())

    def _promote(self, stats: CopyStats) -> None:
        budget = self.config.max_promotions_per_step
        for table, layer in self.kv_manager.promotable():
            if budget <= 0:
                break
            moved = self.kv_manager.start_promotion(table, layer, self.copy_engine, self.kv.gpu, self.kv.host)
            if moved < 0:
                break  # the GPU tier is full
            stats.loaded(table.request_id, moved)
            budget -= 1

    def _run(self, batch: list[Request], prefill: bool, stats: CopyStats) -> list[RequestOutput]:
        tables = [r.table for r in batch]
        assert all(t is not None for t in tables)
        access: PrefillAccess | DecodeAccess | None = None
        try:
            if prefill:
                ids = [t for r in batch for t in r.prompt_ids]
                positions = [p for r in batch for p in range(len(r.prompt_ids))]
                ends = list(itertools.accumulate(len(r.prompt_ids) for r in batch))
                logits_index = [e - 1 for e in ends]
                access = PrefillAccess(
                    tables, [len(r.prompt_ids) for r in batch], self.kv,  # type: ignore[arg-type]
                    self.kv_manager, self.copy_engine, stats)
            else:
                ids = [r.output_ids[-1] for r in batch]
                positions = [r.context_tokens for r in batch]
                logits_index = list(range(len(batch)))
                access = DecodeAccess(tables, positions, self.kv, self.kv_manager,  # type: ignore[arg-type]
                                      self.copy_engine, stats)
            dev = self.device
            logits = self.model(torch.tensor(ids, device=dev), torch.tensor(positions, device=dev),
                                torch.tensor(logits_index, device=dev), access, self.backend)
            tokens = sample(logits, [r.sampling for r in batch], [r.generator for r in batch])
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
        outputs = []
        for r, tok in zip(batch, tokens, strict=True):
            assert r.table is not None
            r.table.num_tokens = len(r.prompt_ids) if prefill else r.table.num_tokens + 1
            if prefill:
                r.state, r.first_token_s = RequestState.RUNNING, now
            reason = r.append(tok.token_id, tok.logprob)
            if reason is not None:
                self._finish(r, reason)
                self._requests.pop(r.request_id, None)
            outputs.append(RequestOutput(
                r.request_id, (tok.token_id,), (tok.logprob,), reason is not None, reason,
                placement=r.admitted_placement,
                bytes_offloaded=stats.offloaded_by_request.get(r.request_id, 0),
                bytes_loaded=stats.loaded_by_request.get(r.request_id, 0)))
        return outputs

    def profile(self) -> CostModel:
        """Re-measure the cost model (only while idle) and use it from now on."""
        from worker_svc.profiler import profile_cost_model

        self.cost_model = profile_cost_model(self)
        return self.cost_model
