"""The engine's device-memory plan: how the free memory of the device is split between the weights,
the per-step buffers and the KV tiers, decided from the model's geometry, the engine config and a
free-bytes figure before any KV tensor is allocated (torch-free arithmetic, so a CPU test can feed it
an H100's or an H200's figure).

The GPU tier gets what is left of ``free * gpu_memory_utilization`` after the weights (in their
target dtype), the step buffers (activations of a ``max_num_batched_tokens`` step, the batch's
logits and sampling workspace, the block-table buffer, the attention workspace) and a safety margin,
less the staging blocks. Staging is sized from the placements that use it (host-placed layers) and
from the host tier that holds them, not as a share of the GPU tier. A plan with no room for the
GPU tier is an error that names every figure, never a 0-block tier.

On a CPU device (no free figure) the tiers keep their fixed default budgets; the budgets are still
computed, for the log.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from common.errors import InvalidArgument
from common.types import KVGeometry

GIB = 1 << 30
MIB = 1 << 20
CPU_DEFAULT_TIER_BYTES = 1 * GIB  # per tier, when nothing is configured on a CPU device
HOST_DEFAULT_TIER_BYTES = 16 * GIB  # host tier next to a GPU
# Kept free on a CUDA device for what the estimates below do not see: the caching allocator's
# fragmentation across differently sized transients, cuBLAS/flash-attn workspaces, copy-stream events.
SAFETY_BYTES = 1 * GIB
# Per logit beyond the lm_head output itself: its float32 copy, log_softmax (float32) and the batched
# sampler's sort (float32 values + int64 indices), softmax and cumulative sum for top-k/top-p.
SAMPLING_BYTES_PER_LOGIT = 4 + 4 + 4 + 8 + 4 + 4 + 4


@dataclass(frozen=True)
class ModelShape:
    """The model dimensions the plan needs (a torch-free view of ``ModelConfig``)."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int


@dataclass(frozen=True)
class PlanInputs:
    """What the plan is computed from, besides the geometry and the model's shape."""

    max_model_len: int  # longest request (prompt + output), tokens
    max_num_seqs: int  # requests holding blocks at once (rows of a step)
    max_num_batched_tokens: int  # tokens of one step
    gpu_memory_utilization: float  # share of the free bytes the engine may use
    weight_bytes: int  # the model's parameters in the KV dtype's size
    paged_decode: bool = False  # decode attention reads the cache in place (no gathered copy)
    gpu_blocks: int | None = None  # explicit tiers (EngineConfig), None: planned
    gpu_kv_gib: float | None = None
    host_blocks: int | None = None
    host_kv_gib: float | None = None
    staging_blocks: int | None = None


@dataclass(frozen=True)
class MemoryPlan:
    """Bytes of every item on the device, and the blocks of each tier. ``free_bytes`` is None on
    a CPU device, where nothing is checked against it."""

    free_bytes: int | None  # device memory free before the engine allocated anything
    usable_bytes: int | None  # free_bytes * gpu_memory_utilization
    weight_bytes: int  # parameters in their target dtype
    activation_bytes: int  # hidden states, q/k/v, MLP and norm temporaries of one full step
    logits_bytes: int  # [rows, vocab] logits, their float32 copies and the sampler's workspace
    block_table_bytes: int  # the persistent block-table buffer (grown by doubling) + a step's gather
    attention_bytes: int  # decode gather of the batch's KV, SDPA's GQA copies, chunk scores
    safety_bytes: int  # margin for what the estimates do not see
    bytes_per_block: int  # one layer's K and V for block_size tokens
    gather_blocks: int  # bound of the decode gather workspace, in blocks (0: paged decode)
    gpu_blocks: int
    staging_blocks: int
    host_blocks: int

    @property
    def buffer_bytes(self) -> int:
        """Step buffers: everything on the device that is neither weights nor KV."""
        return self.activation_bytes + self.logits_bytes + self.block_table_bytes + self.attention_bytes

    @property
    def gpu_kv_bytes(self) -> int:
        """The GPU-tier and staging blocks (one device tensor)."""
        return (self.gpu_blocks + self.staging_blocks) * self.bytes_per_block

    @property
    def device_bytes(self) -> int:
        """Everything the plan puts on the device, safety margin included."""
        return self.weight_bytes + self.buffer_bytes + self.safety_bytes + self.gpu_kv_bytes

    def describe(self) -> str:
        """One line for the start-up log."""

        def g(n: int | None) -> str:
            return "n/a" if n is None else f"{n / GIB:.2f}"

        return (f"memory plan (GiB): free {g(self.free_bytes)}, usable {g(self.usable_bytes)}, weights "
                f"{g(self.weight_bytes)}, activations {g(self.activation_bytes)}, logits "
                f"{g(self.logits_bytes)}, block tables {g(self.block_table_bytes)}, attention "
                f"{g(self.attention_bytes)}, safety {g(self.safety_bytes)}; GPU tier {self.gpu_blocks} "
                f"blocks + staging {self.staging_blocks} ({g(self.gpu_kv_bytes)}), host tier "
                f"{self.host_blocks} blocks ({g(self.host_blocks * self.bytes_per_block)})")


def step_rows(inputs: PlanInputs) -> int:
    """Most requests in one step (each has one logits row): bounded by both step limits."""
    return min(inputs.max_num_seqs, inputs.max_num_batched_tokens)


def activation_bytes(shape: ModelShape, dtype_bytes: int, tokens: int) -> int:
    """Peak temporaries of a layer over ``tokens`` tokens, plus the residual stream: the MLP's
    gate, up and product [T, I]; q/k/v [T, (H + 2 Hkv) D] three times (rotary makes two more copies);
    four [T, hidden] (residual, normed input, attention output, o_proj out) and RMSNorm's two
    float32 [T, hidden]; ids, positions and slot mappings (int64)."""
    qkv = (shape.num_heads + 2 * shape.num_kv_heads) * shape.head_dim
    per_token = (3 * shape.intermediate_size + 3 * qkv + 4 * shape.hidden_size) * dtype_bytes
    per_token += 2 * 4 * shape.hidden_size + 4 * 8
    return tokens * per_token


def logits_bytes(shape: ModelShape, dtype_bytes: int, rows: int) -> int:
    """The lm_head output [rows, vocab] in the model dtype and the sampler's float32/int64 work."""
    return rows * shape.vocab_size * (dtype_bytes + SAMPLING_BYTES_PER_LOGIT)


def block_table_bytes(geometry: KVGeometry, inputs: PlanInputs) -> int:
    """The persistent [L, rows, M] int32 buffer at its largest (rows double from 8 to cover
    max_num_seqs, M doubles up to under twice a longest request's blocks), one and a half times
    that while a growth copies the old into the new, plus one step's [L, B, M] gather of rows."""
    bpr = geometry.blocks_for(inputs.max_model_len)
    rows = 8
    while rows < inputs.max_num_seqs:
        rows *= 2
    buffer = geometry.num_layers * rows * 2 * bpr * 4
    return buffer * 3 // 2 + geometry.num_layers * step_rows(inputs) * bpr * 4


def gather_blocks(geometry: KVGeometry, inputs: PlanInputs) -> int:
    """Blocks of the decode gather workspace at its bound: every row of a step, padded to a longest
    request (0 when decode reads the cache in place). The attention backend never grows its
    workspace past this (``AttentionBackend.max_gather_blocks``)."""
    return 0 if inputs.paged_decode else step_rows(inputs) * geometry.blocks_for(inputs.max_model_len)


def attention_bytes(shape: ModelShape, geometry: KVGeometry, inputs: PlanInputs) -> int:
    """Decode attention over a gathered copy (SDPA, or flash-attn with a block size it cannot page):
    every row's blocks of one layer, padded to the longest row [B, M] blocks, which with masked
    grouped-query attention SDPA's math kernel repeats to the query heads (K and V, H / Hkv times).
    A prefill chunk after earlier chunks attends with a causal mask: its float32 scores and
    probabilities [H, n, S] (one request at a time)."""
    gather = gather_blocks(geometry, inputs) * geometry.bytes_per_block
    if shape.num_heads != shape.num_kv_heads:
        gather += gather * shape.num_heads // shape.num_kv_heads
    chunk = min(inputs.max_num_batched_tokens, inputs.max_model_len)
    scores = 0 if chunk >= inputs.max_model_len else 2 * shape.num_heads * chunk * inputs.max_model_len * 4
    return gather + scores


def staging_for(host_blocks: int, num_layers: int, blocks_per_request: int, max_rows: int) -> int:
    """Staging blocks for the host-placed layers the host tier can hold.

    Only host-placed layers use staging, so none without a host tier. At any moment two adjacent
    layers may hold staging blocks (``common.kv_budget`` staging rule); a full host tier spread
    over alternate layers (interleaved placements with half the layers resident) or over every
    layer (all-host) puts ``2 * host_blocks / layers`` blocks in any adjacent pair, so that much
    staging lets such placements use the whole host tier. Placements that pack the host tier into
    fewer layers are admitted until the staging pool is full (no room, as for any tier): more
    staging would be GPU memory taken from the GPU tier. Never less than two layers of a longest
    request (any single request fits under any placement), never more than a step can read (two
    layers of every row at full length) or the host tier holds."""
    if host_blocks <= 0:
        return 0
    spread = 2 * math.ceil(host_blocks / num_layers)
    return min(host_blocks, max(2 * blocks_per_request, min(spread, 2 * max_rows * blocks_per_request)))


def plan_memory(shape: ModelShape, geometry: KVGeometry, inputs: PlanInputs,
                free_bytes: int | None) -> MemoryPlan:
    """The plan for a device with ``free_bytes`` free before the weights are loaded (None: CPU)."""
    bpb = geometry.bytes_per_block
    bpr = geometry.blocks_for(inputs.max_model_len)
    layers = geometry.num_layers
    e = geometry.dtype_bytes
    rows = step_rows(inputs)
    act = activation_bytes(shape, e, inputs.max_num_batched_tokens)
    logits = logits_bytes(shape, e, rows)
    tables = block_table_bytes(geometry, inputs)
    attn = attention_bytes(shape, geometry, inputs)
    safety = SAFETY_BYTES if free_bytes is not None else 0
    if inputs.host_blocks is not None:
        host = inputs.host_blocks
    elif inputs.host_kv_gib is not None:
        host = int(inputs.host_kv_gib * GIB) // bpb
    else:
        budget = HOST_DEFAULT_TIER_BYTES if free_bytes is not None else CPU_DEFAULT_TIER_BYTES
        host = min(budget // bpb, 8 * layers * bpr)
    staging = (inputs.staging_blocks if inputs.staging_blocks is not None
               else staging_for(host, layers, bpr, rows))
    usable = None if free_bytes is None else int(free_bytes * inputs.gpu_memory_utilization)
    fixed = inputs.weight_bytes + act + logits + tables + attn + safety
    if inputs.gpu_blocks is not None:
        gpu = inputs.gpu_blocks
    elif inputs.gpu_kv_gib is not None:
        gpu = int(inputs.gpu_kv_gib * GIB) // bpb
    elif usable is not None:
        gpu = (usable - fixed) // bpb - staging
    else:
        gpu = min(CPU_DEFAULT_TIER_BYTES // bpb, 8 * layers * bpr)
    plan = MemoryPlan(free_bytes, usable, inputs.weight_bytes, act, logits, tables, attn, safety, bpb,
                      gather_blocks(geometry, inputs), max(0, gpu), staging, host)
    if usable is not None:
        explicit = inputs.gpu_blocks is not None or inputs.gpu_kv_gib is not None
        if (gpu < 1 and not explicit) or plan.device_bytes > usable:  # an explicit 0: all-host
            raise InvalidArgument(_no_room(plan, gpu, explicit))
    return plan


def _no_room(plan: MemoryPlan, gpu: int, explicit: bool) -> str:
    def g(n: int) -> str:
        return f"{n / GIB:.2f} GiB"

    usable = plan.usable_bytes or 0
    staging = plan.staging_blocks * plan.bytes_per_block
    left = usable - plan.weight_bytes - plan.buffer_bytes - plan.safety_bytes - staging
    what = (f"the configured GPU tier ({gpu} blocks, {g(gpu * plan.bytes_per_block)}) does not fit"
            if explicit else "no room is left for the GPU KV tier")
    return (f"device memory plan: {what}: usable {g(usable)} (free {g(plan.free_bytes or 0)} x "
            f"gpu_memory_utilization) - weights {g(plan.weight_bytes)} - activations "
            f"{g(plan.activation_bytes)} - logits {g(plan.logits_bytes)} - block tables "
            f"{g(plan.block_table_bytes)} - attention workspace {g(plan.attention_bytes)} - safety "
            f"{g(plan.safety_bytes)} - staging {plan.staging_blocks} blocks ({g(staging)}) leaves "
            f"{g(left)} at {plan.bytes_per_block} bytes per block; lower max_num_seqs, "
            f"max_num_batched_tokens or max_model_len, or give gpu_blocks / gpu_kv_gib / "
            f"staging_blocks that fit")


def device_free_bytes(device: object, resident_bytes: int) -> int | None:
    """Free bytes of a CUDA ``device`` as if ``resident_bytes`` (the loaded weights) were not yet
    allocated; None for any other device. Cached but unused blocks of torch's allocator are given
    back first, so memory this process freed counts as free."""
    import torch

    dev = torch.device(device)  # type: ignore[call-overload]
    if dev.type != "cuda":
        return None
    torch.cuda.empty_cache()
    return int(torch.cuda.mem_get_info(dev)[0]) + resident_bytes
