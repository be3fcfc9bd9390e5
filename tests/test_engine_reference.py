"""Reference helpers for the engine tests: tiny random HF models saved to a folder, HF greedy
generation with per-token log-probs, and a driver that runs the engine with staggered arrivals.
Also checks the helpers themselves (HF generation agrees with a plain no-cache forward)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import torch

from common.types import FinishReason, Placement, SamplingParams
from worker_svc.engine import Engine, EngineConfig
from worker_svc.kv.offload import CopyEngine
from worker_svc.outputs import StepOutput

VOCAB = 300


def build_hf_model(arch: str = "llama", layers: int = 2, heads: int = 4, kv_heads: int = 2,
                   tie: bool = False, seed: int = 0, rope_llama3: bool = False) -> Any:
    """A tiny random HF causal LM in float32 (weights large enough that greedy choices are clear)."""
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    common: dict[str, Any] = dict(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=kv_heads, max_position_embeddings=256,
        tie_word_embeddings=tie, initializer_range=0.08, bos_token_id=None, eos_token_id=None,
        pad_token_id=0)
    torch.manual_seed(seed)
    if arch == "llama":
        rope = ({"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                 "original_max_position_embeddings": 32, "rope_theta": 10000.0} if rope_llama3 else None)
        if rope:
            common["rope_scaling"] = rope
        model: Any = LlamaForCausalLM(LlamaConfig(**common))
    elif arch == "qwen2":
        model = Qwen2ForCausalLM(Qwen2Config(**common))
    elif arch == "mistral":
        from transformers import MistralConfig, MistralForCausalLM

        model = MistralForCausalLM(MistralConfig(**common, sliding_window=None))
    else:
        raise ValueError(arch)
    if arch == "qwen2":  # random q/k/v biases, so the bias path is exercised
        with torch.no_grad():
            for layer in model.model.layers:
                for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                    proj.bias.normal_(0.0, 0.1)
    return model.float().eval()


def save_model(model: Any, folder: Path, shard: str | None = None) -> Path:
    kwargs = {"max_shard_size": shard} if shard else {}
    model.save_pretrained(folder, **kwargs)
    return folder


@dataclass
class Reference:
    token_ids: list[int]
    logprobs: list[float]


def hf_generate(model: Any, prompt: list[int], max_new: int) -> Reference:
    with torch.no_grad():
        out = model.generate(torch.tensor([prompt]), max_new_tokens=max_new, min_new_tokens=max_new,
                             do_sample=False, output_logits=True, return_dict_in_generate=True,
                             pad_token_id=0)
    ids = out.sequences[0, len(prompt):].tolist()
    lps = [torch.log_softmax(lg[0].float(), -1)[t].item() for lg, t in zip(out.logits, ids, strict=True)]
    return Reference(ids, lps)


@dataclass
class Job:
    prompt: list[int]
    max_tokens: int
    arrive_step: int = 0  # submit before this engine step (0: before the first)
    placement: str | None = None
    sampling: SamplingParams | None = None
    preemption: str = ""  # "": the engine's default


@dataclass
class Result:
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    finish_reason: FinishReason | None = None


def run_engine(engine: Engine, jobs: dict[str, Job], max_steps: int = 500,
               steps: list[StepOutput] | None = None,
               aborts: dict[int, str] | None = None) -> dict[str, Result]:
    """Run ``jobs`` to the end; every ``StepOutput`` goes to ``steps`` when given, and ``aborts``
    maps a step number to a request to abort before it."""
    results = {rid: Result() for rid in jobs}
    step = 0
    while step < max_steps:
        for rid, job in jobs.items():
            if job.arrive_step == step:
                sampling = job.sampling or SamplingParams(max_tokens=job.max_tokens)
                placement = (Placement.from_letters(job.placement, engine.geometry.num_layers)
                             if job.placement else None)
                engine.add_request(rid, job.prompt, sampling, placement, job.preemption)
        if aborts and step in aborts:
            engine.abort(aborts[step])
        pending_arrivals = any(j.arrive_step > step for j in jobs.values())
        if not engine.has_work() and not pending_arrivals:
            break
        out = engine.step()
        if steps is not None:
            steps.append(out)
        for o in out.outputs:
            r = results[o.request_id]
            r.token_ids += o.new_token_ids
            r.logprobs += o.logprobs
            if o.finished:
                r.finish_reason = o.finish_reason
        step += 1
    assert not engine.has_work(), "engine did not finish in time"
    return results


def make_engine(folder: Path, block_size: int = 16, copy_engine: CopyEngine | None = None,
                **kwargs: Any) -> Engine:
    config = EngineConfig(model=str(folder), block_size=block_size, **kwargs)
    return Engine.from_config(config, copy_engine=copy_engine)


def prompt_of(length: int, seed: int) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(1, VOCAB, (length,), generator=g).tolist()


def assert_all_free(engine: Engine) -> None:
    """Both tiers and the staging pool are back to full, and no request holds a table."""
    usage = engine.usage()
    layers = engine.geometry.num_layers
    assert usage.gpu.free_blocks == usage.gpu.total_blocks and usage.gpu.used_per_layer == (0,) * layers
    assert usage.host.free_blocks == usage.host.total_blocks and usage.host.used_per_layer == (0,) * layers
    staging = engine.kv_manager.staging
    assert staging.idle and staging.num_free == staging.num_blocks
    assert not engine.kv_manager.tables


def assert_matches(result: Result, ref: Reference) -> None:
    assert result.token_ids == ref.token_ids
    assert len(result.logprobs) == len(ref.logprobs)
    for got, want in zip(result.logprobs, ref.logprobs, strict=True):
        assert abs(got - want) < 1e-4, (got, want)


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_hf_reference_agrees_with_plain_forward(arch: str) -> None:
    model = build_hf_model(arch)
    prompt = prompt_of(7, 1)
    ref = hf_generate(model, prompt, 4)
    seq = list(prompt)
    with torch.no_grad():
        for _ in range(4):
            seq.append(int(model(torch.tensor([seq])).logits[0, -1].argmax()))
    assert seq[len(prompt):] == ref.token_ids
