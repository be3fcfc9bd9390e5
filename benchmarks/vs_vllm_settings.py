"""The settings of the vLLM comparison: model shape, workload, and equal KV on both sides.

A ``Setting`` names one KV-limited workload (``kv1``: the cache holds about one request, ``kv3``:
about three, ``long``: 2048-token prompts where vLLM queues) or the one-at-a-time check (``solo``:
each request sent when the previous one finished, the whole stack's per-request time).
``KvBudget`` converts vLLM's KV cache (blocks of 32 tokens that span every layer) into our
per-layer blocks, so that both sides get exactly the same number of GPU-tier token slots. Pure
arithmetic, no I/O.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from layerkv.bench.workload import PromptLengths, WorkloadSpec

VLLM_BLOCK_TOKENS = 32  # vLLM's CPU attention backend requires block_size 32 here


@dataclass(frozen=True)
class ModelShape:
    """The random-weight Llama both sides load (saved once as an HF folder)."""

    num_layers: int = 8
    hidden_size: int = 512
    intermediate_size: int = 1536
    num_heads: int = 8
    num_kv_heads: int = 4
    vocab_size: int = 4096
    max_position_embeddings: int = 4096
    seed: int = 0

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    def parameters(self) -> int:
        """Parameter count (untied embeddings and LM head), for the output."""
        h, kv = self.hidden_size, self.num_kv_heads * self.head_dim
        per_layer = 2 * h * h + 2 * h * kv + 3 * h * self.intermediate_size + 2 * h
        return self.num_layers * per_layer + 2 * self.vocab_size * h + h

    def kv_bytes_per_token_layer(self, dtype_bytes: int = 4) -> int:
        """K and V of one token in one layer."""
        return 2 * self.num_kv_heads * self.head_dim * dtype_bytes


MODEL_SHAPES: dict[str, ModelShape] = {
    # about 7M parameters: steps of a few ms, so a KV-limited run of tens of requests takes minutes
    "small": ModelShape(num_layers=8, hidden_size=256, intermediate_size=768, num_heads=4, num_kv_heads=2,
                        vocab_size=2048),
    # about 30M parameters: a 2048-token prefill takes on the order of a second on one core
    "medium": ModelShape(),
    # about 51M parameters, the size of the earlier measurements (slow on 2 shared cores)
    "large": ModelShape(num_layers=12, hidden_size=576, intermediate_size=1728, num_heads=9, num_kv_heads=3),
    # for checking the harness end to end in seconds
    "tiny": ModelShape(num_layers=4, hidden_size=128, intermediate_size=256, num_heads=4, num_kv_heads=2,
                       vocab_size=512),
}


@dataclass(frozen=True)
class KvBudget:
    """Equal GPU-tier KV on both sides, in each side's own blocks.

    vLLM v1 keeps one block of its pool as the "null block" that no request ever holds, so its
    override is one more than the usable blocks that the conversion equates with ours.
    """

    vllm_blocks: int  # usable vLLM blocks (VLLM_BLOCK_TOKENS tokens, every layer)
    num_layers: int
    our_block_size: int  # tokens per block of one layer on our side

    def __post_init__(self) -> None:
        if self.vllm_blocks < 1 or self.num_layers < 1:
            raise ValueError("the KV budget needs at least one block and one layer")
        if self.our_block_size < 1 or VLLM_BLOCK_TOKENS % self.our_block_size:
            raise ValueError(f"our block size {self.our_block_size} must divide vLLM's {VLLM_BLOCK_TOKENS}")

    @property
    def vllm_override(self) -> int:
        """``--num-gpu-blocks-override``: the usable blocks plus vLLM's null block."""
        return self.vllm_blocks + 1

    @property
    def tokens(self) -> int:
        """Token slots per layer: what one vLLM block count means in tokens."""
        return self.vllm_blocks * VLLM_BLOCK_TOKENS

    @property
    def our_gpu_blocks(self) -> int:
        """Our GPU tier: one per-layer block per ``our_block_size`` tokens, in every layer."""
        return self.vllm_blocks * self.num_layers * (VLLM_BLOCK_TOKENS // self.our_block_size)

    def describe(self) -> str:
        return (f"vLLM {self.vllm_blocks} usable blocks (override {self.vllm_override}, one is vLLM's null"
                f" block) x {VLLM_BLOCK_TOKENS} tokens x {self.num_layers} layers"
                f" = ours {self.vllm_blocks} x {VLLM_BLOCK_TOKENS // self.our_block_size} x {self.num_layers}"
                f" = {self.our_gpu_blocks} per-layer blocks of {self.our_block_size} tokens"
                f" ({self.tokens} tokens per layer on each side)")


def vllm_blocks_for(tokens_per_request: int, requests_held: float) -> int:
    """vLLM blocks that hold ``requests_held`` requests of ``tokens_per_request`` tokens each."""
    return max(1, math.ceil(requests_held * tokens_per_request / VLLM_BLOCK_TOKENS))


@dataclass(frozen=True)
class Setting:
    """One KV-limited workload point."""

    name: str
    summary: str
    rate: float  # requests per second (Poisson)
    num_requests: int
    prompt_tokens: int  # fixed per setting
    output_min: int  # output lengths uniform in [min, max]; each request's max_tokens is its draw
    output_max: int
    requests_held: float  # how many longest requests the GPU-tier KV holds
    ttft_slo_s: float
    tpot_slo_s: float
    sequential: bool = False  # send each request when the previous one has finished (no overlap)

    def __post_init__(self) -> None:
        if not (self.rate > 0 and self.num_requests >= 1 and self.prompt_tokens >= 1):
            raise ValueError(f"setting {self.name}: rate, request count and prompt length must be positive")
        if not 1 <= self.output_min <= self.output_max:
            raise ValueError(f"setting {self.name}: need 1 <= output_min <= output_max")

    @property
    def max_request_tokens(self) -> int:
        return self.prompt_tokens + self.output_max

    def vllm_blocks(self) -> int:
        return vllm_blocks_for(self.max_request_tokens, self.requests_held)

    def workload(self, seed: int, vocab_high: int) -> WorkloadSpec:
        """The one workload both sides receive (token ids below the model's vocabulary)."""
        return WorkloadSpec(
            rate=self.rate,
            num_requests=self.num_requests,
            prompt=PromptLengths(kind="fixed", tokens=self.prompt_tokens),
            output_min=self.output_min,
            output_max=self.output_max,
            seed=seed,
            vocab_low=1,  # keep id 0 (the tokenizer's unknown token) out of prompts
            vocab_high=vocab_high,
        )


# Sized for the "small" model on 2 shared cores (vLLM: ~16 ms per decode step, ~0.1 s per 512-token
# prefill): arrivals near what the KV-limited system serves, so that queueing decides TTFT, and
# each system's run takes about a minute. ``long`` is decode-heavy (256-768 output tokens): with
# 64-128, vLLM on an AVX-512 core served its 0.5 requests/s without queueing (mean TTFT 352 ms
# against 299 ms unloaded), so the setting no longer showed the case it names; with these outputs
# each request holds its KV for seconds, and the 1.5 requests' worth of cache is what queues.
SETTINGS: dict[str, Setting] = {
    "kv1": Setting("kv1", "the GPU-tier KV holds about one request", rate=0.4, num_requests=24,
                   prompt_tokens=512, output_min=64, output_max=192, requests_held=1.0,
                   ttft_slo_s=2.0, tpot_slo_s=0.05),
    "kv3": Setting("kv3", "the GPU-tier KV holds about three requests", rate=1.2, num_requests=40,
                   prompt_tokens=512, output_min=64, output_max=192, requests_held=3.0,
                   ttft_slo_s=2.0, tpot_slo_s=0.05),
    "long": Setting("long", "2048-token prompts, KV for about 1.5 requests: vLLM queues (LayerKV's case)",
                    rate=0.5, num_requests=24, prompt_tokens=2048, output_min=256, output_max=768,
                    requests_held=1.5, ttft_slo_s=5.0, tpot_slo_s=0.1),
    "solo": Setting("solo", "one request at a time (each sent when the previous finished): per-request time",
                    rate=1.0, num_requests=12, prompt_tokens=512, output_min=64, output_max=192,
                    requests_held=3.0, ttft_slo_s=2.0, tpot_slo_s=0.05, sequential=True),
}


def host_blocks_for(setting: Setting, num_layers: int, our_block_size: int) -> int:
    """Our host tier: every request of the run at once in every layer (it must never be the limit)."""
    per_layer = math.ceil(setting.max_request_tokens / our_block_size)
    return per_layer * num_layers * setting.num_requests


def staging_blocks_for(setting: Setting, budget: KvBudget) -> int:
    """Our staging pool (GPU blocks only host-placed layers compute in; extra to the equal tier):
    two layers of one longest request, the least that lets one request run with host layers.
    Alternating placements need one layer per request, so this serves two such requests at once."""
    return 2 * math.ceil(setting.max_request_tokens / budget.our_block_size)
