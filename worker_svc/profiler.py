"""Measures the engine's cost model (``common.types.CostModel``) at start-up or on demand: pinned
host<->device copy bandwidth, prefill time against prompt length, decode-step time against batch
size and context. Runs real requests through an idle engine, so the figures include everything a
step does; the fit is least squares."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

import torch

from common.types import CostModel, Placement, SamplingParams

if TYPE_CHECKING:
    from worker_svc.engine import Engine


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


def profile_cost_model(engine: Engine, max_prompt: int = 2048) -> CostModel:
    """Fit a ``CostModel`` on an idle engine (it must have no requests)."""
    assert not engine.has_work(), "profile the cost model only while the engine is idle"
    d2h, h2d = measure_bandwidth(engine.device)
    vocab = engine.model_config.vocab_size
    per_layer_free = engine.kv_manager.gpu.num_free // engine.geometry.num_layers
    longest = min(max_prompt, engine.config.max_num_batched_tokens,  # one prefill step per prompt
                  engine.max_model_len - 8, per_layer_free * engine.geometry.block_size - 8)
    lengths = sorted({max(1, longest // d) for d in (16, 8, 4, 2, 1)})
    _run_alone(engine, [[1 % vocab] * 8], 1)  # warm-up
    prefill_rows, prefill_ys = [], []
    for n in lengths:
        kind, seconds, _ = _run_alone(engine, [[(i * 7 + 1) % vocab for i in range(n)]], 1)[0]
        assert kind == "prefill"
        prefill_rows.append([1.0, float(n), float(n) ** 2])
        prefill_ys.append(seconds)
    base, per_token, per_token2 = _lstsq(prefill_rows, prefill_ys)
    decode_rows, decode_ys = [], []
    context = max(1, min(longest // 8, 512))
    for batch in (1, 4, 16):
        needed = batch * engine.geometry.blocks_for(context + 4) * engine.geometry.num_layers
        if needed > engine.kv_manager.gpu.num_free:
            break
        steps = _run_alone(engine, [[(i + b) % vocab for i in range(context)] for b in range(batch)], 4)
        for kind, seconds, size in steps:
            if kind == "decode" and size == batch:
                decode_rows.append([1.0, float(batch), float(batch * context)])
                decode_ys.append(seconds)
    if len(decode_rows) >= 3:
        dec = _lstsq(decode_rows, decode_ys)
    else:  # too little room to vary the batch: a constant step time
        dec = [decode_ys[0] if decode_ys else 0.01, 0.0, 0.0]
    return CostModel(d2h_bytes_per_s=d2h, h2d_bytes_per_s=h2d, prefill_base_s=base,
                     prefill_per_token_s=per_token, prefill_per_token2_s=per_token2,
                     decode_base_s=dec[0], decode_per_request_s=dec[1], decode_per_context_token_s=dec[2])
