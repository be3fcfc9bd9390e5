"""Engine throughput against HuggingFace transformers, side by side in one run (best of --repeats).

For each batch size, B prompts of P tokens are submitted together and each generates D tokens
(greedy, no early stop). Prefill tokens/s = B*P / prefill time; decode tokens/s = tokens produced
by decode steps / decode time. transformers runs the same weights: one batched forward over the
prompts with a KV cache, then D-1 cached decode forwards.

    python benchmarks/engine_throughput.py                      # tiny preset, CPU, float32
    python benchmarks/engine_throughput.py --model llama3-8b-random --device cuda --dtype bfloat16 \\
        --prompt-len 512 --gen-len 64
"""

from __future__ import annotations

import argparse
import platform
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from common.types import Placement, SamplingParams
from worker_svc.engine import Engine, EngineConfig, resolve_device
from worker_svc.model.loader import load_model, parse_dtype


@dataclass
class Throughput:
    prefill_tok_s: float
    decode_tok_s: float


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def run_engine(engine: Engine, batch: int, prompt_len: int, gen_len: int) -> Throughput:
    vocab = engine.model_config.vocab_size
    layers = engine.geometry.num_layers
    for b in range(batch):
        prompt = [(i * 31 + b * 7 + 1) % vocab for i in range(prompt_len)]
        engine.add_request(f"b{batch}-{b}", prompt, SamplingParams(max_tokens=gen_len, ignore_eos=True),
                           Placement.all_gpu(layers))
    prefill_s = decode_s = 0.0
    decode_tokens = 0
    while engine.has_work():
        out = engine.step()
        _sync(engine.device)
        if out.stats.kind == "prefill":
            prefill_s += out.stats.duration_s
        elif out.stats.kind == "decode":
            decode_s += out.stats.duration_s
            decode_tokens += out.stats.num_tokens
    return Throughput(batch * prompt_len / prefill_s, decode_tokens / decode_s)


def run_config(model: str, device: str, dtype: str, block_size: int, max_batch: int, prompt_len: int,
               gen_len: int, num_layers: int) -> EngineConfig:
    """An engine config sized for exactly this run: one prefill step per batch (the step budget is
    the largest batch's prompts, which the memory plan charges as activations), the largest batch
    as max_num_seqs, prompt + gen as max_model_len, a GPU tier of exactly the blocks the largest
    batch needs (the rest of the device stays free for the transformers copy of the weights) and no
    host tier (every request is all-GPU, so no staging)."""
    per_layer = -(-(prompt_len + gen_len) // block_size)  # blocks per layer of one request
    step_tokens = max_batch * prompt_len
    return EngineConfig(model=model, device=device, dtype=dtype, block_size=block_size,
                        max_prefill_tokens=step_tokens, max_num_batched_tokens=step_tokens,
                        max_num_seqs=max_batch, max_model_len=prompt_len + gen_len,
                        gpu_blocks=max_batch * per_layer * num_layers, host_blocks=0)


def build_engine(model: str, device: str, dtype: str, block_size: int, max_batch: int, prompt_len: int,
                 gen_len: int) -> Engine:
    """The engine of ``run_config``. On CUDA the memory plan checks that it fits beside the weights
    and its buffers and raises, naming every figure, when it does not."""
    dev = resolve_device(device)
    torch_dtype = parse_dtype(dtype if dtype != "auto" else "bfloat16" if dev.type == "cuda" else "float32")
    loaded = load_model(model, dev, torch_dtype)
    config = run_config(model, str(dev), str(torch_dtype).removeprefix("torch."), block_size, max_batch,
                        prompt_len, gen_len, loaded.config.num_layers)
    engine = Engine(config, loaded, dev, torch_dtype)
    assert engine.capacity.gpu_blocks == config.gpu_blocks, engine.memory_plan.describe()
    return engine


def best(runs: list[Throughput]) -> Throughput:
    return Throughput(max(r.prefill_tok_s for r in runs), max(r.decode_tok_s for r in runs))


def hf_model_like(engine: Engine) -> torch.nn.Module:
    """A transformers LlamaForCausalLM with the engine's config and the very same weights."""
    from transformers import LlamaConfig, LlamaForCausalLM

    mc = engine.model_config
    cfg = LlamaConfig(vocab_size=mc.vocab_size, hidden_size=mc.hidden_size,
                      intermediate_size=mc.intermediate_size, num_hidden_layers=mc.num_layers,
                      num_attention_heads=mc.num_heads, num_key_value_heads=mc.num_kv_heads,
                      head_dim=mc.head_dim, max_position_embeddings=mc.max_position_embeddings,
                      rms_norm_eps=mc.rms_norm_eps,  # RoPE: the engine's inv_freq is copied below
                      tie_word_embeddings=mc.tie_word_embeddings)
    with torch.device("meta"):  # cast on meta: no float32 copy of the weights on the device
        model = LlamaForCausalLM(cfg).to(engine.dtype)  # type: ignore[arg-type]
    model = model.to_empty(device=engine.device)  # type: ignore[arg-type]
    model.load_state_dict(engine.model.state_dict(), strict=False, assign=False)
    model.model.rotary_emb.inv_freq = engine.model.model.rotary_emb.inv_freq.clone()
    return model.eval()


@torch.inference_mode()
def run_transformers(model: torch.nn.Module, device: torch.device, vocab: int, batch: int,
                     prompt_len: int, gen_len: int) -> Throughput:
    from transformers import DynamicCache

    ids = torch.tensor([[(i * 31 + b * 7 + 1) % vocab for i in range(prompt_len)] for b in range(batch)],
                       device=device)
    cache = DynamicCache()
    _sync(device)
    start = time.perf_counter()
    out = model(input_ids=ids, past_key_values=cache, use_cache=True)
    nxt = out.logits[:, -1].argmax(-1, keepdim=True)
    _sync(device)
    prefill_s = time.perf_counter() - start
    start = time.perf_counter()
    for _ in range(gen_len - 1):
        out = model(input_ids=nxt, past_key_values=out.past_key_values, use_cache=True)
        nxt = out.logits[:, -1].argmax(-1, keepdim=True)
    _sync(device)
    decode_s = time.perf_counter() - start
    return Throughput(batch * prompt_len / prefill_s, batch * (gen_len - 1) / decode_s)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="tiny-llama")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--batches", default="1,8,32")
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--gen-len", type=int, default=32)
    parser.add_argument("--block-size", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3, help="best of this many runs per figure")
    args = parser.parse_args()
    batches = [int(b) for b in args.batches.split(",")]
    engine = build_engine(args.model, args.device, args.dtype, args.block_size, max(batches),
                          args.prompt_len, args.gen_len)
    hf = hf_model_like(engine)
    vocab = engine.model_config.vocab_size
    run_engine(engine, 2, 16, 4)  # warm-up both
    run_transformers(hf, engine.device, vocab, 2, 16, 4)
    name = torch.cuda.get_device_name() if engine.device.type == "cuda" else platform.processor() or "cpu"
    print(engine.memory_plan.describe())
    print(f"model={args.model} device={engine.device} ({name}, {torch.get_num_threads()} threads) "
          f"dtype={args.dtype} prompt={args.prompt_len} gen={args.gen_len} torch={torch.__version__}")
    print("| batch | engine prefill tok/s | transformers prefill tok/s | engine decode tok/s "
          "| transformers decode tok/s |")
    print("|---|---|---|---|---|")
    for b in batches:
        ours_runs, theirs_runs = [], []
        for _ in range(args.repeats):  # interleaved, so both see the same machine load
            ours_runs.append(run_engine(engine, b, args.prompt_len, args.gen_len))
            theirs_runs.append(run_transformers(hf, engine.device, vocab, b, args.prompt_len, args.gen_len))
        ours, theirs = best(ours_runs), best(theirs_runs)
        print(f"| {b} | {ours.prefill_tok_s:,.0f} | {theirs.prefill_tok_s:,.0f} | {ours.decode_tok_s:,.0f} "
              f"| {theirs.decode_tok_s:,.0f} |", flush=True)


if __name__ == "__main__":
    main()
