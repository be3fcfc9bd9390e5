"""Sampling: greedy cuts, top-k and top-p support, raw-distribution log-probs, seeded reproducibility."""

from __future__ import annotations

import math

import torch

from common.types import SamplingParams
from worker_svc.sampling import make_generator, sample

LOGITS = torch.tensor([[2.0, 1.0, 0.5, -1.0, 0.0]])


def draw(params: SamplingParams, n: int = 300, seed: int = 0) -> set[int]:
    gen = make_generator(seed)
    return {sample(LOGITS, [params], [gen])[0].token_id for _ in range(n)}


def test_greedy_picks_argmax_with_raw_logprob() -> None:
    tok = sample(LOGITS, [SamplingParams()], [make_generator(0)])[0]
    assert tok.token_id == 0
    assert math.isclose(tok.logprob, torch.log_softmax(LOGITS[0], -1)[0].item(), rel_tol=1e-6)


def test_top_k_limits_support() -> None:
    assert draw(SamplingParams(temperature=1.0, top_k=2)) == {0, 1}
    assert draw(SamplingParams(temperature=5.0, top_k=1)) == {0}


def test_top_p_keeps_smallest_prefix_reaching_mass() -> None:
    probs = torch.softmax(LOGITS[0], -1)  # ~[0.52, 0.19, 0.12, 0.03, 0.07]... top two reach 0.6
    assert probs[0] < 0.6 < probs[0] + probs[1]
    assert draw(SamplingParams(temperature=1.0, top_p=0.6)) == {0, 1}
    assert draw(SamplingParams(temperature=1.0, top_p=0.01)) == {0}


def test_temperature_sampling_covers_all_tokens_and_is_seeded() -> None:
    assert draw(SamplingParams(temperature=1.0)) == {0, 1, 2, 3, 4}
    params = SamplingParams(temperature=1.0)
    a, b = make_generator(7), make_generator(7)
    seq_a = [sample(LOGITS, [params], [a])[0].token_id for _ in range(20)]
    seq_b = [sample(LOGITS, [params], [b])[0].token_id for _ in range(20)]
    assert seq_a == seq_b


def test_logprob_is_of_raw_distribution_even_when_sampling() -> None:
    raw = torch.log_softmax(LOGITS[0], -1)
    tok = sample(LOGITS, [SamplingParams(temperature=0.3, top_k=3)], [make_generator(1)])[0]
    assert math.isclose(tok.logprob, raw[tok.token_id].item(), rel_tol=1e-6)


def test_seeded_draws_depend_only_on_seed_and_absolute_position() -> None:
    """A rerun from prompt + the tokens already generated (a requeue) continues the same stream."""
    params = SamplingParams(temperature=1.0)
    logits = torch.randn(1, 50, generator=torch.Generator().manual_seed(3))
    first = make_generator(11, position=4)  # a 4-token prompt
    full = [sample(logits, [params], [first])[0].token_id for _ in range(12)]
    rerun = make_generator(11, position=4 + 5)  # the prompt plus the 5 tokens already streamed
    rest = [sample(logits, [params], [rerun])[0].token_id for _ in range(7)]
    assert rest == full[5:]
    assert len(set(full)) > 1  # really sampling, not a constant stream


def test_greedy_rows_keep_positions_in_step_in_a_mixed_batch() -> None:
    params = [SamplingParams(), SamplingParams(temperature=1.0)]
    logits = torch.randn(2, 50, generator=torch.Generator().manual_seed(4))
    gens = [make_generator(1, 3), make_generator(2, 3)]
    out = [sample(logits, params, gens) for _ in range(3)]
    assert all(o[0].token_id == int(logits[0].argmax()) for o in out)  # greedy stays exact
    alone = make_generator(2, 3)
    solo = [sample(logits[1:], [params[1]], [alone])[0].token_id for _ in range(3)]
    assert [o[1].token_id for o in out] == solo
