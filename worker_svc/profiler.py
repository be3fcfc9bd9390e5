"""Measures the engine's cost model (``common.types.CostModel``) at start-up or on demand: copy
bandwidth through the engine's own copy engine and KV tiers, prefill time against prompt length,
decode-step time against batch size and context. Runs real requests through an idle engine, so
the figures include everything a step does; the fit is least squares over the median of each
point's samples.

A profile is bounded by a soft time budget: one pass over every point always runs (about a second
on the tiny preset), further passes only while the budget lasts, and prompt lengths stop growing
once half of it is spent. ``startup_profile`` applies the engine's ``profile`` mode (off, startup,
file); a saved profile (``common.cost_profile``) is reused only by an engine it was measured for.
"""

from __future__ import annotations

import logging
import statistics
import time
from collections import defaultdict
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from common.cost_profile import CostProfile, ProfileInfo, ProfileKey, ProfileSource
from common.errors import InvalidArgument
from common.types import CostModel, Placement, SamplingParams

if TYPE_CHECKING:
    from worker_svc.engine import Engine

log = logging.getLogger(__name__)

MAX_COPY_BYTES = 256 << 20  # largest bandwidth probe: beyond it a link shows no higher rate
DEFAULT_MAX_PROMPT = 2048


def measure_bandwidth(device: torch.device, nbytes: int = 64 << 20, repeats: int = 3) -> tuple[float, float]:
    """(device-to-host, host-to-device) bytes/s with pinned host memory (plain copies on CPU)."""
    n = nbytes // 2
    pin = device.type == "cuda"
    host = torch.empty(n, dtype=torch.float16, pin_memory=pin)
    dev = torch.empty(n, dtype=torch.float16, device=device)

    def timed(dst: torch.Tensor, src: torch.Tensor) -> float:
        best = float("inf")
        for _ in range(repeats):
            _sync(device)
            start = time.perf_counter()
            dst.copy_(src, non_blocking=pin)
            _sync(device)
            best = min(best, time.perf_counter() - start)
        return nbytes / best

    return timed(host, dev), timed(dev, host)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure_copy_bandwidth(engine: Engine, target_s: float, repeats: int = 3) -> tuple[float, float] | None:
    """(device-to-host, host-to-device) bytes/s of the engine's own block copies (its copy engine, its
    GPU-side and host tiers: what offload and stream-in use). The probe grows until one copy takes
    ``target_s`` (small copies measure per-call overhead, not the link). None without a host tier."""
    kv = engine.kv
    block_bytes = kv.gpu[0].numel() * kv.gpu.element_size() if kv.gpu.shape[0] else 0
    most = min(kv.gpu.shape[0], kv.host.shape[0], MAX_COPY_BYTES // max(1, block_bytes))
    if most <= 0:
        return None
    copier = engine.copy_engine

    def timed(src: torch.Tensor, dst: torch.Tensor, n: int) -> float:
        ids = list(range(n))  # the engine is idle: every block is free, its contents garbage
        _sync(engine.device)
        start = time.perf_counter()
        copier.copy_blocks(src, ids, dst, ids).wait()
        _sync(engine.device)
        return time.perf_counter() - start

    def rate(src: torch.Tensor, dst: torch.Tensor) -> float:
        n = min(most, 8)
        while True:
            seconds = timed(src, dst, n)
            if seconds >= target_s or n == most:
                break
            n = min(most, n * 4)
        best = min([seconds, *(timed(src, dst, n) for _ in range(repeats - 1))])
        return n * block_bytes / max(best, 1e-9)

    return rate(kv.gpu, kv.host), rate(kv.host, kv.gpu)


def _run_alone(engine: Engine, prompts: list[list[int]], max_tokens: int) -> list[tuple[str, float, int]]:
    """Run prompts together (all GPU); (step kind, seconds, tokens or batch) of every step."""
    layers = engine.geometry.num_layers
    for i, p in enumerate(prompts):
        engine.add_request(f"__profile_{i}", p, SamplingParams(max_tokens=max_tokens, ignore_eos=True),
                           Placement.all_gpu(layers))
    steps = []
    while engine.has_work():
        out = engine.step()
        _sync(engine.device)
        steps.append((out.stats.kind, out.stats.duration_s, out.stats.num_tokens))
    return steps


def _lstsq(rows: list[list[float]], ys: list[float]) -> list[float]:
    a = torch.tensor(rows, dtype=torch.float64)
    b = torch.tensor(ys, dtype=torch.float64)[:, None]
    return [max(0.0, float(x)) for x in torch.linalg.lstsq(a, b).solution[:, 0]]


def profile_cost_model(engine: Engine, budget_s: float = 1.0,
                       max_prompt: int = DEFAULT_MAX_PROMPT) -> CostModel:
    """Fit a ``CostModel`` on an idle engine (it must have no requests) within about ``budget_s``."""
    assert not engine.has_work(), "profile the cost model only while the engine is idle"
    start = time.perf_counter()

    def spent() -> float:
        return time.perf_counter() - start

    defaults = CostModel()
    copies = measure_copy_bandwidth(engine, target_s=min(0.02, budget_s / 50))
    d2h, h2d = copies if copies is not None else (defaults.d2h_bytes_per_s, defaults.h2d_bytes_per_s)
    vocab = engine.model_config.vocab_size
    layers, block = engine.geometry.num_layers, engine.geometry.block_size
    per_layer_free = engine.kv_manager.gpu.num_free // layers
    step_tokens = min(engine.config.max_num_batched_tokens, engine.config.max_prefill_tokens)
    longest = max(1, min(max_prompt, step_tokens,  # one prefill step per prompt
                         engine.max_model_len - 8, per_layer_free * block - 8))
    _run_alone(engine, [[1 % vocab] * 8], 1)  # warm-up

    # Points: prompt lengths (prefill) and (batch, context per request) pairs (decode); context and
    # batch vary separately, so their coefficients are not confounded.
    lengths = sorted({max(1, longest // d) for d in (16, 8, 4, 2, 1)})
    seqs = max(1, engine.config.max_num_seqs)
    short_ctx, long_ctx = max(1, min(16, longest)), max(1, min(longest // 2, 1024))
    big_batch = min(16, seqs, max(1, engine.config.max_num_batched_tokens // short_ctx))
    decode_points = sorted({(1, short_ctx), (1, long_ctx), (big_batch, short_ctx)})
    prefill_s: dict[int, list[float]] = defaultdict(list)
    decode_s: dict[tuple[int, int], list[float]] = defaultdict(list)
    passes = 0
    while passes == 0 or spent() < budget_s * passes / (passes + 1):  # another pass fits the budget
        for n in lengths:
            if passes == 0 and len(prefill_s) >= 3 and spent() > budget_s / 2:
                break  # longer prompts would exceed the budget: three points fit the quadratic
            if passes > 0 and n not in prefill_s:
                continue
            kind, seconds, tokens = _run_alone(engine, [[(i * 7 + 1) % vocab for i in range(n)]], 1)[0]
            assert kind == "prefill" and tokens == n, f"a {n}-token prompt took a {kind} step of {tokens}"
            prefill_s[n].append(seconds)
        for batch, context in decode_points:
            needed = batch * engine.geometry.blocks_for(context + 4) * layers
            if needed > engine.kv_manager.gpu.num_free:
                continue
            prompts = [[(i + b) % vocab for i in range(context)] for b in range(batch)]
            for kind, seconds, size in _run_alone(engine, prompts, 4):
                if kind == "decode" and size == batch:
                    decode_s[(batch, context)].append(seconds)
        passes += 1

    rows = [[1.0, float(n), float(n) ** 2] for n in sorted(prefill_s)]
    ys = [statistics.median(prefill_s[n]) for n in sorted(prefill_s)]
    if len(rows) >= 3:
        base, per_token, per_token2 = _lstsq(rows, ys)
    else:  # one or two lengths (a tiny engine): a line through them
        base, per_token = _lstsq([r[:2] for r in rows], ys) if len(rows) == 2 else (0.0, ys[0] / rows[0][1])
        per_token2 = 0.0
    points = sorted(decode_s)
    if len(points) >= 3:
        dec = _lstsq([[1.0, float(b), float(b * c)] for b, c in points],
                     [statistics.median(decode_s[p]) for p in points])
    else:  # too little room to vary the batch: a constant step time
        dec = [statistics.median(decode_s[points[0]]) if points else defaults.decode_base_s, 0.0, 0.0]
    log.debug("profile: %d passes in %.2f s", passes, spent())
    return CostModel(d2h_bytes_per_s=d2h, h2d_bytes_per_s=h2d, prefill_base_s=base,
                     prefill_per_token_s=per_token, prefill_per_token2_s=per_token2,
                     decode_base_s=dec[0], decode_per_request_s=dec[1], decode_per_context_token_s=dec[2])


def profile_key(engine: Engine) -> ProfileKey:
    """What this engine's profile is valid for."""
    device = engine.device.type
    if device == "cuda":
        device = f"cuda ({torch.cuda.get_device_name(engine.device)})"
    dtype = str(engine.dtype).removeprefix("torch.")
    return ProfileKey(model=str(engine.model_name), device=device, dtype=dtype,
                      num_layers=engine.geometry.num_layers, block_size=engine.geometry.block_size)


def measure_profile(engine: Engine) -> CostProfile:
    """Profile the idle engine now (saved to its profile file in ``file`` mode)."""
    started = time.time()
    begin = time.perf_counter()
    cost = profile_cost_model(engine, budget_s=engine.config.profile_budget_s)
    info = ProfileInfo(ProfileSource.MEASURED, time.perf_counter() - begin, started)
    profile = CostProfile(cost, info, profile_key(engine))
    if engine.config.profile == "file":
        try:
            profile.save(engine.config.profile_file)
        except OSError as exc:
            raise InvalidArgument(f"cannot write profile file {engine.config.profile_file!r}: {exc}") from exc
    return profile


def startup_profile(engine: Engine) -> CostProfile:
    """The profile the engine starts with, per ``engine.config.profile``: off, startup or file."""
    mode = engine.config.profile
    if mode == "off":
        return CostProfile()
    if mode == "file":
        path = Path(engine.config.profile_file)
        if path.exists():
            saved = CostProfile.load(path)
            key = profile_key(engine)
            if saved.key != key:
                raise InvalidArgument(
                    f"profile file {str(path)!r} was measured for {saved.key}, this worker is {key}: "
                    "delete the file to measure this one, or give another --profile-file")
            return saved
    return measure_profile(engine)  # startup, or a file that does not exist yet (saved there)
