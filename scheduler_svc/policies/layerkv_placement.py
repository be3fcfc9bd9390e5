"""Placement and prefill charge of the ``layerkv`` policy for one request on one worker.

The placement is the paper's minimum GPU-resident layers for the prompt (``common.placement``),
fitted to the free GPU, host and staging blocks; the prefill charge is the time the worker takes
to prefill the prompt in chunks of its per-step token budget, which is also how long it stalls
every running decode. Block arithmetic is ``common.kv_budget``'s.
"""

from __future__ import annotations

from collections.abc import Sequence

from common import kv_budget
from common.placement import interleaved, min_resident_layers
from common.types import Placement
from scheduler_svc.policies.base import WorkerSnapshot

# Beyond this many chunk steps per prompt the charge is computed in closed form (cheap, and equal
# whenever either compute or offload dominates every chunk).
MAX_CHUNK_STEPS = 4096


def chunk_tokens(worker: WorkerSnapshot) -> int:
    """Prompt tokens per step: the token budget less one per running decode (0: unchunked)."""
    if worker.max_num_batched_tokens <= 0:
        return 0
    return max(1, worker.max_num_batched_tokens - len(worker.running))


def placement_for(
    num_prompt_tokens: int,
    headroom_tokens: int,
    worker: WorkerSnapshot,
    gpu_free: int,
    host_free: int,
    host_demand: Sequence[int] = (),
    min_gpu_layers: int = 0,
) -> Placement | None:
    """Fewest resident layers whose offload hides under the prefill, fitted to the free blocks.

    The rule looks at the prompt (what the prefill offloads); the budget at the prompt plus
    ``headroom_tokens`` per layer (what the ledger reserves). More GPU layers than the rule's
    minimum are used only when host or staging blocks run short; fewer only when GPU blocks
    run short. None when no split of the layers fits every limit.
    ``host_demand``: host-placed blocks per layer already on the worker (staging demand).
    ``min_gpu_layers``: keep at least this many layers on the GPU where its free blocks allow
    (the newcomer's TPOT check asks for more when streaming host layers makes its decode too slow).
    """
    geometry = worker.geometry
    layers = geometry.num_layers
    per_layer = max(1, kv_budget.blocks_per_layer(geometry, num_prompt_tokens + headroom_tokens))
    rule = min_resident_layers(num_prompt_tokens, geometry, worker.cost_model)
    gpu_max = min(layers, gpu_free // per_layer)  # most GPU layers the free budget holds
    gpu_min = max(0, layers - host_free // per_layer)  # fewest GPU layers the host tier allows
    resident = min(max(rule, gpu_min, min_gpu_layers), gpu_max)
    if resident < gpu_min:
        return None
    # Host layers stream through the staging blocks: while they do not fit, keep more layers on
    # the GPU (interleaved, so each adjacent pair has fewer host layers) as far as it holds them.
    staging = worker.staging_blocks_total
    already = list(host_demand) or [0] * layers
    for gpu_layers in range(resident, gpu_max + 1):
        placement = interleaved(layers, gpu_layers)
        if staging <= 0 or placement.host_layers == 0:
            return placement  # staging not reported, or nothing streams through it
        new = kv_budget.demand(geometry, num_prompt_tokens + headroom_tokens, placement)
        with_new = [a + b for a, b in zip(already, new.host_per_layer, strict=True)]
        if kv_budget.staging_fits(with_new, staging):
            return placement
    return None


def predicted_prefill_s(
    num_tokens: int, placement: Placement, worker: WorkerSnapshot, chunk_tokens: int = 0
) -> float:
    """Prefill time as the worker runs it, in steps of ``chunk_tokens`` (0: one step).

    Each chunk step takes its compute (the prompt's cost from the chunk's first to its last
    token, plus the per-step base) or its offload when there are more host layers than the
    rule hides; the sum is the time every running decode is stalled by this prefill.
    """
    cost = worker.cost_model
    chunk = num_tokens if chunk_tokens <= 0 else chunk_tokens
    steps = -(-num_tokens // max(chunk, 1))

    def offload_s(tokens: int) -> float:
        nbytes = placement.host_layers * worker.geometry.bytes_per_layer(tokens)
        return cost.transfer_s(nbytes, cost.d2h_bytes_per_s)

    if steps > MAX_CHUNK_STEPS:  # a budget far below the prompt: the sums, not per-step maxima
        compute = cost.prefill_s(num_tokens) + (steps - 1) * cost.correction * cost.prefill_base_s
        return max(compute, offload_s(num_tokens))
    total = 0.0
    for start in range(0, num_tokens, chunk):
        end = min(num_tokens, start + chunk)
        # the difference cancels the per-step base, which every chunk step pays
        compute = cost.prefill_s(end) - cost.prefill_s(start) + cost.correction * cost.prefill_base_s
        total += max(compute, offload_s(end - start))
    return total
