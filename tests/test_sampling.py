"""Sampling: greedy cuts, top-k and top-p support, raw-distribution log-probs, seeded reproducibility;
the batched sampler draws the row-wise one's tokens for seeded rows and the right distribution for
unseeded ones."""

from __future__ import annotations

import math
import random

import pytest
import torch

from common.types import SamplingParams
from tests.sampling_rowwise import sample_rowwise
from worker_svc import sampling
from worker_svc.sampling import _cut_distribution, _unseeded_weights, make_generator, sample

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


# ---- the batched sampler against the row-wise one it replaced (tests/sampling_rowwise.py) ----

TEMPERATURES = (0.0, 0.25, 0.7, 1.0, 1.8)
TOP_PS = (1.0, 1.0, 0.95, 0.9, 0.5, 0.05)


def _random_params(rng: random.Random, vocab: int, seeded: bool) -> SamplingParams:
    top_ks = (0, 0, 1, 2, 7, 100, vocab - 1, vocab, vocab + 5)
    return SamplingParams(temperature=rng.choice(TEMPERATURES), top_k=rng.choice(top_ks),
                          top_p=rng.choice(TOP_PS), seed=rng.randrange(1 << 40) if seeded else None)


def _logits(kind: str, rows: int, vocab: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    if kind == "tied":  # few distinct values: ties straddle every top-k and top-p cut
        return torch.randint(-40, 40, (rows, vocab), generator=g).float() / 8
    if kind == "bf16":  # a bf16 model's logits, widened: ties in the tail, as in real serving
        return (torch.randn(rows, vocab, generator=g) * 4).bfloat16().float()
    return torch.randn(rows, vocab, generator=g) * 3


@pytest.mark.parametrize("kind", ["normal", "tied", "bf16"])
@pytest.mark.parametrize("case", range(6))
def test_seeded_rows_draw_the_row_wise_samplers_tokens(kind: str, case: int) -> None:
    """Every seeded row (greedy or not, any cut) gets the very token id and log-prob the row-wise
    sampler drew, step after step, whatever else is in the batch."""
    rng = random.Random(case)
    vocab, rows = 1000, 12
    params = [_random_params(rng, vocab, seeded=True) for _ in range(rows)]
    starts = [rng.randrange(1, 500) for _ in range(rows)]
    old_gens = [make_generator(p.seed, s) for p, s in zip(params, starts, strict=True)]  # type: ignore[arg-type]
    new_gens = [make_generator(p.seed, s) for p, s in zip(params, starts, strict=True)]  # type: ignore[arg-type]
    sampled_rows = 0
    for step in range(15):
        logits = _logits(kind, rows, vocab, seed=1000 * case + step)
        old = sample_rowwise(logits, params, old_gens)
        new = sample(logits, params, new_gens)
        assert [t.token_id for t in new] == [t.token_id for t in old], (kind, case, step)
        assert [t.logprob for t in new] == [t.logprob for t in old]
        sampled_rows += sum(not p.greedy for p in params)
    assert [g.position for g in new_gens] == [s + 15 for s in starts]  # greedy rows advanced too
    assert sampled_rows > 0


DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(),
                                                                reason="no CUDA device on this machine"))]


@pytest.mark.parametrize("device", DEVICES)
def test_unseeded_rows_do_not_change_the_seeded_rows_draws(device: str) -> None:
    """A mixed batch: greedy rows stay the argmax, seeded rows draw the row-wise tokens (the
    row-wise sampler ran on the CPU; on a GPU the kernels round alike on logits without ties),
    unseeded rows draw from their own cut support."""
    vocab = 400
    params = [SamplingParams(), SamplingParams(seed=5), SamplingParams(temperature=1.0, seed=9),
              SamplingParams(temperature=1.0, top_k=3), SamplingParams(temperature=0.8, top_p=0.9, seed=3),
              SamplingParams(temperature=2.0), SamplingParams(temperature=1.0, top_p=0.3)]
    seeded = [i for i, p in enumerate(params) if p.seed is not None]
    old_gens = [make_generator(p.seed if p.seed is not None else 0, 7) for p in params]
    new_gens = [make_generator(p.seed, 7) if p.seed is not None else None for p in params]
    rng = torch.Generator(device=device).manual_seed(0)
    unseeded_draws: set[int] = set()
    for step in range(40):
        logits = _logits("normal", len(params), vocab, seed=step).to(device)
        old = sample_rowwise(logits, params, old_gens)
        new = sample(logits, params, new_gens, rng)
        assert [new[i].token_id for i in seeded] == [old[i].token_id for i in seeded]
        assert new[0].token_id == int(logits[0].argmax())
        assert new[3].token_id in set(torch.topk(logits[3], 3).indices.tolist())
        raw = torch.log_softmax(logits, -1).cpu()
        for i, tok in enumerate(new):
            assert math.isclose(tok.logprob, raw[i, tok.token_id].item(), rel_tol=1e-6)
        unseeded_draws.add(new[5].token_id)
    assert len(unseeded_draws) > 20  # temperature 2 over 400 tokens: really sampling


@pytest.mark.parametrize("device", DEVICES)
def test_unseeded_rows_are_reproducible_from_the_batch_generator(device: str) -> None:
    logits = _logits("normal", 16, 300, seed=1).to(device)
    params = [SamplingParams(temperature=1.0, top_p=0.95)] * 16

    def run(seed: int) -> list[int]:
        rng = torch.Generator(device=device).manual_seed(seed)
        return [t.token_id for _ in range(3) for t in sample(logits, params, [None] * 16, rng)]

    assert run(4) == run(4)
    assert run(4) != run(5)


def _expected(logits: list[float], p: SamplingParams) -> list[float]:
    """The distribution a row must be drawn from, written out independently in float64."""
    scaled = [x / p.temperature for x in logits]
    order = sorted(range(len(scaled)), key=lambda i: -scaled[i])
    keep = order[:p.top_k] if 0 < p.top_k < len(scaled) else order
    top = max(scaled)
    weights = {i: math.exp(scaled[i] - top) for i in keep}
    total = sum(weights.values())
    kept, mass = [], 0.0
    for i in keep:  # the smallest prefix whose mass reaches top_p
        if mass >= p.top_p and p.top_p < 1.0:
            break
        kept.append(i)
        mass += weights[i] / total
    norm = sum(weights[i] for i in kept)
    return [weights[i] / norm if i in kept else 0.0 for i in range(len(logits))]


# chi-square critical values at p = 0.001 by degrees of freedom (no scipy in the environment)
CHI2_CRIT = {1: 10.83, 2: 13.82, 3: 16.27, 4: 18.47, 5: 20.52, 6: 22.46, 7: 24.32}
DIST_LOGITS = [2.0, 1.0, 0.5, -1.0, 0.0, -3.0, 1.5, 0.25]


def _chi2(counts: list[int], probs: list[float]) -> float:
    n = sum(counts)
    return sum((c - n * q) ** 2 / (n * q) for c, q in zip(counts, probs, strict=True) if q > 0)


COMPANION = SamplingParams(temperature=1.0, top_k=6, top_p=0.6)  # shares every batch below


def _assert_follows(counts: list[int], params: SamplingParams) -> None:
    """Never a token outside the kept set, and frequencies that pass a chi-square test against the
    distribution (which a 30 % warmer one fails: the test can tell)."""
    probs = _expected(DIST_LOGITS, params)
    kept = [i for i, q in enumerate(probs) if q > 0]
    assert all(counts[i] == 0 for i in range(len(probs)) if probs[i] == 0), (counts, probs)
    assert len(kept) >= 2
    crit = CHI2_CRIT[len(kept) - 1]
    assert _chi2(counts, probs) < crit, (counts, probs)
    warmer = _expected(DIST_LOGITS, SamplingParams(temperature=params.temperature * 1.3))
    other = [q if probs[i] > 0 else 0.0 for i, q in enumerate(warmer)]
    assert _chi2(counts, [q / sum(other) for q in other]) > crit


@pytest.mark.parametrize("candidates", [1024, 2], ids=["nucleus-in-candidates", "nucleus-by-sort"])
@pytest.mark.parametrize("params", [
    SamplingParams(temperature=0.8),
    SamplingParams(temperature=1.3, top_k=4),
    SamplingParams(temperature=1.0, top_p=0.8),
    SamplingParams(temperature=0.5, top_k=5, top_p=0.9),
    SamplingParams(temperature=2.0, top_k=7, top_p=0.7),
], ids=lambda p: f"t{p.temperature}-k{p.top_k}-p{p.top_p}")
@pytest.mark.parametrize("device", DEVICES)
def test_unseeded_rows_follow_the_cut_distribution(params: SamplingParams, candidates: int, device: str,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """20,000 unseeded rows in one batch, every other one with other cuts; with 2 candidates most
    nuclei are larger and take the sort."""
    monkeypatch.setattr(sampling, "NUCLEUS_CANDIDATES", candidates)
    n = 20_000
    logits = torch.tensor([DIST_LOGITS], device=device).expand(2 * n, -1).contiguous()
    rng = torch.Generator(device=device).manual_seed(0)
    drawn = sample(logits, [params, COMPANION] * n, [None] * (2 * n), rng)
    counts = [[0] * len(DIST_LOGITS), [0] * len(DIST_LOGITS)]
    for row, tok in enumerate(drawn):
        counts[row % 2][tok.token_id] += 1
    _assert_follows(counts[0], params)
    _assert_follows(counts[1], COMPANION)


@pytest.mark.parametrize("cut", [_cut_distribution, _unseeded_weights], ids=["seeded", "unseeded"])
def test_a_row_without_cuts_keeps_its_tail_next_to_rows_with_cuts(cut) -> None:
    """Rows with top_p 1 or top_k 0 are never cut, even batched with rows that are (a top-p cut
    at 1.0 would drop the tail whose preceding mass already rounds to 1 in float32)."""
    logits = torch.tensor([[0.0, -30.0, -31.0, -32.0]] * 3)
    params = [SamplingParams(temperature=1.0), SamplingParams(temperature=1.0, top_p=0.5),
              SamplingParams(temperature=1.0, top_k=2)]
    probs = cut(logits, params)
    assert torch.equal(probs[0], torch.softmax(logits[0], -1)) and bool((probs[0] > 0).all())
    assert probs[1].tolist() == [1.0, 0.0, 0.0, 0.0]
    assert bool((probs[2, :2] > 0).all()) and probs[2, 2:].tolist() == [0.0, 0.0]


def test_an_unseeded_draw_never_lands_past_the_last_weighted_token(monkeypatch: pytest.MonkeyPatch) -> None:
    """A uniform whose product with the total rounds up to the total still picks a token with weight."""
    weights = torch.tensor([[0.0, 0.3, 0.7, 0.0, 0.0], [0.5, 0.0, 0.0, 0.0, 0.0]])
    monkeypatch.setattr(torch, "rand", lambda shape, **kw: torch.ones(shape, dtype=kw.get("dtype")))
    assert sampling._inverse_cdf(weights, None).tolist() == [2, 0]
    monkeypatch.setattr(torch, "rand", lambda shape, **kw: torch.zeros(shape, dtype=kw.get("dtype")))
    assert sampling._inverse_cdf(weights, None).tolist() == [1, 0]  # never a token without weight


def test_engine_samples_unseeded_requests_from_its_seed(tmp_path) -> None:
    """Unseeded requests draw from the engine's batch generator: the same engine seed gives the
    same tokens, another seed other tokens; a seeded request's stream is its own either way."""
    from tests.test_engine_reference import Job, build_hf_model, make_engine, prompt_of, run_engine

    build_hf_model("llama", layers=2).save_pretrained(tmp_path)
    hot = SamplingParams(max_tokens=12, temperature=1.5, ignore_eos=True)
    seeded = SamplingParams(max_tokens=12, temperature=1.5, top_p=0.9, seed=21, ignore_eos=True)

    def run(engine_seed: int) -> dict[str, list[int]]:
        engine = make_engine(tmp_path, gpu_blocks=64, seed=engine_seed)
        jobs = {"a": Job(prompt_of(5, 1), 12, sampling=hot), "b": Job(prompt_of(9, 2), 12, sampling=hot),
                "s": Job(prompt_of(7, 3), 12, sampling=seeded)}
        return {rid: r.token_ids for rid, r in run_engine(engine, jobs).items()}

    first, again, other = run(0), run(0), run(1)
    assert first == again
    assert (first["a"], first["b"]) != (other["a"], other["b"])
    assert first["s"] == other["s"]
    assert len(set(first["a"])) > 3  # really sampling
