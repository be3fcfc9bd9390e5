"""SLOs of ``layerkv bench``: seconds or multiples of the fleet's batch-1 figures (the TPOT-bound setting)."""

from __future__ import annotations

import pytest

from common.errors import InvalidArgument
from common.types import CostModel
from layerkv.bench.slo import (
    Batch1Times,
    SloTarget,
    choose_source,
    from_cost_models,
    from_probe,
    is_profiled,
    needs_batch1,
    probe_prompts,
    resolve_slos,
)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("0.05", SloTarget(seconds=0.05)),
        ("2", SloTarget(seconds=2.0)),
        ("1.5x", SloTarget(multiple=1.5)),
        (" 3X ", SloTarget(multiple=3.0)),
    ],
)
def test_slo_parsing(text: str, expected: SloTarget) -> None:
    assert SloTarget.parse(text, "--tpot-slo") == expected


@pytest.mark.parametrize("text", ["", "x", "fast", "1.5xx", "0", "-1", "0x", "inf", "nan"])
def test_bad_slos_name_the_option(text: str) -> None:
    with pytest.raises(InvalidArgument, match="--tpot-slo"):
        SloTarget.parse(text, "--tpot-slo")


def test_slos_from_the_cost_model_are_multiples_of_its_batch1_step_and_prefill() -> None:
    cost = CostModel(
        prefill_base_s=0.01,
        prefill_per_token_s=1e-4,
        decode_base_s=0.004,
        decode_per_request_s=0.001,
        decode_per_context_token_s=1e-6,
    )
    b1 = from_cost_models([cost], prompt_tokens=500)
    assert b1.source == "cost-model" and b1.prompt_tokens == 500
    assert b1.ttft_s == pytest.approx(0.01 + 500e-4)  # prefill of the prompt alone
    assert b1.step_s == pytest.approx(0.004 + 0.001 + 500e-6)  # one request holding the prompt
    slos = resolve_slos(SloTarget(multiple=4.0), SloTarget(multiple=1.5), b1)
    assert slos.tpot_s == pytest.approx(1.5 * 0.0055)
    assert slos.ttft_s == pytest.approx(4.0 * 0.06)
    # Several workers: the slowest one's figures, so a lone request can meet the SLO anywhere.
    slow = CostModel(decode_base_s=0.02, prefill_per_token_s=2e-4)
    both = from_cost_models([cost, slow], prompt_tokens=500)
    assert both.step_s == pytest.approx(0.02) and both.ttft_s == pytest.approx(0.1)
    with pytest.raises(InvalidArgument, match="no worker"):
        from_cost_models([], prompt_tokens=500)


def test_seconds_need_no_batch1_figures_and_are_kept_as_given() -> None:
    ttft, tpot = SloTarget(seconds=2.0), SloTarget(seconds=0.05)
    assert not needs_batch1(ttft, tpot) and needs_batch1(ttft, SloTarget(multiple=1.5))
    slos = resolve_slos(ttft, tpot, None)
    assert (slos.ttft_s, slos.tpot_s, slos.batch1) == (2.0, 0.05, None)
    b1 = Batch1Times(ttft_s=0.3, step_s=0.01, prompt_tokens=64, source="probe")
    mixed = resolve_slos(ttft, SloTarget(multiple=2.0), b1)
    assert (mixed.ttft_s, mixed.tpot_s) == (2.0, pytest.approx(0.02))


def test_probe_figures_are_medians() -> None:
    b1 = from_probe([0.2, 0.1, 5.0], [0.004, 0.006, 0.5], prompt_tokens=128)
    assert (b1.ttft_s, b1.step_s, b1.source) == (0.2, 0.006, "probe")
    with pytest.raises(InvalidArgument, match="probe"):
        from_probe([0.1], [], prompt_tokens=128)


def test_auto_takes_the_cost_model_only_when_every_worker_profiled_one() -> None:
    profiled = CostModel(decode_base_s=0.004)
    assert is_profiled(profiled) and not is_profiled(CostModel())
    assert choose_source("auto", [profiled, profiled]) == "cost-model"
    assert choose_source("auto", [profiled, CostModel()]) == "probe"
    assert choose_source("auto", []) == "probe"
    assert choose_source("cost-model", [CostModel()]) == "cost-model"
    assert choose_source("probe", [profiled]) == "probe"


def test_probe_prompts_are_distinct_and_reproducible() -> None:
    prompts = probe_prompts(32, 3, vocab_high=256, seed=7)
    assert len(prompts) == 3 and len(set(prompts)) == 3 and all(len(p) == 32 for p in prompts)
    assert all(0 <= t < 256 for p in prompts for t in p)
    assert probe_prompts(32, 3, vocab_high=256, seed=7) == prompts
