"""The benchmark workload generator: reproducible, Poisson, and the lengths it was asked for."""

from __future__ import annotations

import itertools
import math
import statistics

import pytest
from pydantic import ValidationError

from common.errors import InvalidArgument
from layerkv.bench.workload import PromptLengths, WorkloadSpec, generate, parse_floats, parse_prompt_sweep


def spec(**overrides: object) -> WorkloadSpec:
    base: dict[str, object] = {
        "rate": 4.0,
        "num_requests": 400,
        "prompt": PromptLengths(tokens=64),
        "output_min": 8,
        "output_max": 24,
        "seed": 1,
    }
    return WorkloadSpec.model_validate({**base, **overrides})


def test_same_seed_same_requests_other_seed_other_requests() -> None:
    assert generate(spec()) == generate(spec())
    other = generate(spec(seed=2))
    assert [r.arrival_s for r in other] != [r.arrival_s for r in generate(spec())]


def test_poisson_arrivals_have_the_requested_rate() -> None:
    requests = generate(spec(rate=5.0, num_requests=4000))
    assert requests[0].arrival_s == 0.0
    gaps = [b.arrival_s - a.arrival_s for a, b in itertools.pairwise(requests)]
    assert all(g >= 0 for g in gaps)
    # Exponential gaps: mean 1/rate and standard deviation equal to the mean.
    assert statistics.fmean(gaps) == pytest.approx(0.2, rel=0.05)
    assert statistics.pstdev(gaps) == pytest.approx(0.2, rel=0.08)
    assert [r.index for r in requests] == list(range(4000))


def test_fixed_prompts_and_uniform_outputs() -> None:
    requests = generate(spec(vocab_low=10, vocab_high=20))
    assert {len(r.prompt_token_ids) for r in requests} == {64}
    assert all(10 <= t < 20 for r in requests for t in r.prompt_token_ids)
    outputs = [r.max_tokens for r in requests]
    assert min(outputs) == 8 and max(outputs) == 24
    assert statistics.fmean(outputs) == pytest.approx(16, rel=0.05)


def test_lognormal_prompts_are_long_tailed_and_clipped() -> None:
    prompt = PromptLengths(kind="lognormal", tokens=200, sigma=1.0, min_tokens=16, max_tokens=4000)
    lengths = sorted(len(r.prompt_token_ids) for r in generate(spec(prompt=prompt, num_requests=3000)))
    assert lengths[0] >= 16 and lengths[-1] <= 4000
    median = lengths[len(lengths) // 2]
    assert median == pytest.approx(200, rel=0.1)
    assert statistics.fmean(lengths) > 1.3 * median  # the tail pulls the mean above the median
    assert lengths[int(0.99 * len(lengths))] > 5 * median


def test_changing_outputs_keeps_the_arrivals_and_prompts() -> None:
    a, b = generate(spec()), generate(spec(output_min=100, output_max=200))
    assert [r.arrival_s for r in a] == [r.arrival_s for r in b]
    assert [r.prompt_token_ids for r in a] == [r.prompt_token_ids for r in b]
    assert all(100 <= r.max_tokens <= 200 for r in b)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("512", [PromptLengths(tokens=512)]),
        ("128, 512,1024", [PromptLengths(tokens=n) for n in (128, 512, 1024)]),
        ("lognormal:300", [PromptLengths(kind="lognormal", tokens=300)]),
        (
            "lognormal:300:0.5:10:900",
            [PromptLengths(kind="lognormal", tokens=300, sigma=0.5, min_tokens=10, max_tokens=900)],
        ),
    ],
)
def test_prompt_sweep_parsing(text: str, expected: list[PromptLengths]) -> None:
    assert parse_prompt_sweep(text) == expected


@pytest.mark.parametrize("text", ["abc", "lognormal", "lognormal:1:2:3", "uniform:5", "0", "lognormal:100:9"])
def test_bad_prompt_specs_are_rejected(text: str) -> None:
    with pytest.raises((InvalidArgument, ValidationError)):
        parse_prompt_sweep(text)


def test_rate_sweep_parsing() -> None:
    assert parse_floats("0.5,1, 2", "--rate") == [0.5, 1.0, 2.0]
    for bad in ("", "x", "1,-2", "0", "nan", str(math.inf)):
        with pytest.raises(InvalidArgument):
            parse_floats(bad, "--rate")


@pytest.mark.parametrize(
    "bad", [{"rate": 0.0}, {"num_requests": 0}, {"output_min": 30, "output_max": 20}, {"vocab_low": 256}]
)
def test_bad_specs_are_rejected(bad: dict[str, object]) -> None:
    with pytest.raises(ValidationError):
        spec(**bad)
