"""The online cost-model fit converges to the timings a worker actually measures."""

from __future__ import annotations

import random

import pytest

from common.errors import InvalidArgument
from common.types import CostModel
from scheduler_svc.cost_fit import CostFitParams, CostFitter, FitError, FitReport, StepTiming

PROFILE = CostModel(
    d2h_bytes_per_s=5e9,
    h2d_bytes_per_s=5e9,
    prefill_base_s=0.002,
    prefill_per_token_s=1e-4,
    prefill_per_token2_s=1e-8,
    decode_base_s=0.010,
    decode_per_request_s=0.001,
    decode_per_context_token_s=1e-6,
)


def _noisy(rng: random.Random, value: float, rel: float = 0.03) -> float:
    return value * (1.0 + rng.uniform(-rel, rel))


@pytest.mark.parametrize("true_factor", [0.4, 1.0, 2.5])
def test_prefill_correction_converges_to_measured_ratio(true_factor: float) -> None:
    rng = random.Random(7)
    fitter = CostFitter(PROFILE)
    truth = CostModel(**{**PROFILE.__dict__, "correction": true_factor})
    for _ in range(60):
        n = rng.randint(16, 4096)
        fitter.observe(StepTiming("prefill", _noisy(rng, truth.prefill_s(n)), n))
    fitted = fitter.model()
    assert fitted.correction == pytest.approx(true_factor, rel=0.03)
    assert fitted.prefill_s(1000) == pytest.approx(truth.prefill_s(1000), rel=0.03)
    assert fitter.prefill_samples == 60


def test_prefill_outliers_and_empty_steps_are_ignored() -> None:
    fitter = CostFitter(PROFILE)
    fitter.observe(StepTiming("prefill", PROFILE.prefill_s(100) * 2.0, 100))
    assert fitter.model().correction == pytest.approx(2.0)
    fitter.observe(StepTiming("prefill", PROFILE.prefill_s(100) * 500.0, 100))  # a stall
    fitter.observe(StepTiming("prefill", 0.0, 100))
    fitter.observe(StepTiming("prefill", 0.5, 0))
    assert fitter.model().correction == pytest.approx(2.0)
    assert fitter.prefill_samples == 1


def test_decode_step_fit_recovers_coefficients() -> None:
    rng = random.Random(11)
    truth = CostModel(
        h2d_bytes_per_s=2e9, decode_base_s=0.004, decode_per_request_s=0.002, decode_per_context_token_s=3e-6
    )
    fitter = CostFitter(PROFILE)
    for _ in range(400):
        batch = rng.randint(1, 32)
        context = batch * rng.randint(64, 2048)
        loaded = rng.choice([0, rng.randint(1, 200) * 1_000_000])
        measured = _noisy(rng, truth.decode_step_s(batch, context, loaded), rel=0.002)
        fitter.observe(StepTiming("decode", measured, batch, context_tokens=context, bytes_loaded=loaded))
    fitted = fitter.model()
    assert fitted.decode_base_s == pytest.approx(truth.decode_base_s, rel=0.1)
    assert fitted.decode_per_request_s == pytest.approx(truth.decode_per_request_s, rel=0.05)
    assert fitted.decode_per_context_token_s == pytest.approx(truth.decode_per_context_token_s, rel=0.05)
    assert fitted.h2d_bytes_per_s == pytest.approx(truth.h2d_bytes_per_s, rel=0.05)
    for batch, context, loaded in [(1, 100, 0), (16, 16_000, 50_000_000), (32, 60_000, 0)]:
        assert fitted.decode_step_s(batch, context, loaded) == pytest.approx(
            truth.decode_step_s(batch, context, loaded), rel=0.03
        )


def test_decode_fit_with_a_constant_batch_predicts_the_observed_point() -> None:
    # Only one operating point is ever seen: the fit cannot separate the coefficients, but it must
    # predict that point, and keep every coefficient non-negative.
    fitter = CostFitter(PROFILE)
    for _ in range(100):
        fitter.observe(StepTiming("decode", 0.05, 4, context_tokens=2000))
    fitted = fitter.model()
    assert fitted.decode_step_s(4, 2000) == pytest.approx(0.05, rel=0.01)
    assert min(fitted.decode_base_s, fitted.decode_per_request_s, fitted.decode_per_context_token_s) >= 0.0


def test_decode_fit_follows_a_slowdown() -> None:
    fitter = CostFitter(PROFILE)
    rng = random.Random(3)
    for scale in (1.0, 3.0):
        for _ in range(300):
            batch = rng.randint(1, 16)
            context = batch * 500
            fitter.observe(
                StepTiming("decode", scale * PROFILE.decode_step_s(batch, context), batch, context)
            )
    assert fitter.model().decode_step_s(8, 4000) == pytest.approx(
        3.0 * PROFILE.decode_step_s(8, 4000), rel=0.05
    )


def test_offload_bandwidth_from_prefills_that_waited_for_copies() -> None:
    fitter = CostFitter(PROFILE, CostFitParams(bandwidth_alpha=0.5))
    true_bw = 1e9
    for n in [1000, 2000, 3000, 4000] * 5:
        duration = 0.2
        fitter.observe(
            StepTiming("prefill", duration, n, bytes_offloaded=int(true_bw * duration), copy_wait_s=0.05)
        )
    assert fitter.model().d2h_bytes_per_s == pytest.approx(true_bw, rel=0.01)


def test_hidden_offload_only_raises_the_bandwidth_estimate() -> None:
    fitter = CostFitter(PROFILE)
    # Copies hid under a 0.1 s prefill: the link is at least 2e9 B/s, below the profile's 5e9.
    fitter.observe(StepTiming("prefill", 0.1, 1000, bytes_offloaded=200_000_000))
    assert fitter.model().d2h_bytes_per_s == pytest.approx(5e9)
    # Hidden 1e9 bytes in 0.1 s: at least 1e10 B/s.
    fitter.observe(StepTiming("prefill", 0.1, 1000, bytes_offloaded=1_000_000_000))
    assert fitter.model().d2h_bytes_per_s == pytest.approx(1e10)


def test_unknown_step_kind_is_rejected() -> None:
    with pytest.raises(InvalidArgument, match="step kind"):
        CostFitter(PROFILE).observe(StepTiming("chunked", 0.1, 10))


def test_mixed_steps_teach_the_prefill_correction_beyond_their_decodes() -> None:
    # A chunked-prefill step: 4 decodes over 3000 context tokens plus a 512-token chunk, measured
    # with prefill twice as slow as profiled. The decode part is charged at the (profiled) decode
    # fit, the rest teaches the correction.
    fitter = CostFitter(PROFILE)
    truth = CostModel(**{**PROFILE.__dict__, "correction": 2.0})
    for _ in range(40):
        duration = PROFILE.decode_step_s(4, 3000) + truth.prefill_s(512)
        fitter.observe(StepTiming("mixed", duration, 4, 3000, num_prefill_tokens=512, num_decode_requests=4))
    assert fitter.model().correction == pytest.approx(2.0, rel=1e-6)
    assert fitter.decode_samples == 0  # the decode fit is not fed from a split it made itself
    # a mixed step without prompt tokens, or faster than its decodes alone, teaches nothing
    fitter = CostFitter(PROFILE)
    fitter.observe(StepTiming("mixed", 1.0, 4, 3000, num_prefill_tokens=0, num_decode_requests=4))
    fitter.observe(StepTiming("mixed", 1e-6, 4, 3000, num_prefill_tokens=512, num_decode_requests=4))
    assert fitter.prefill_samples == 0 and fitter.model() == CostFitter(PROFILE).model()


def test_fresh_fitter_reproduces_the_profile() -> None:
    fitted = CostFitter(PROFILE).model()
    assert fitted.prefill_s(777) == pytest.approx(PROFILE.prefill_s(777))
    assert fitted.decode_step_s(5, 3000, 10_000_000) == pytest.approx(
        PROFILE.decode_step_s(5, 3000, 10_000_000)
    )


def test_fit_reports_its_one_step_ahead_error_over_a_window() -> None:
    # The profile says 10 ms per decode step and 0.1 ms per prompt token; the worker is twice as slow.
    fitter = CostFitter(CostModel(decode_base_s=0.01, prefill_per_token_s=1e-4),
                        CostFitParams(error_window=16))
    assert fitter.report() == FitReport(FitError(0, 0.0), FitError(0, 0.0), 16, 0)
    fitter.observe(StepTiming("decode", 0.02, 1, 100))
    fitter.observe(StepTiming("prefill", 0.02, 100))
    first = fitter.report()
    # Each step was predicted before it was folded in: 10 ms against 20 ms measured is 50 % off.
    assert first.decode == FitError(1, pytest.approx(0.5))
    assert first.prefill == FitError(1, pytest.approx(0.5))
    assert first.steps_fitted == 2
    for _ in range(40):
        fitter.observe(StepTiming("decode", 0.02, 1, 100))
        fitter.observe(StepTiming("mixed", 0.04, 101, 100, num_prefill_tokens=100, num_decode_requests=1))
    learnt = fitter.report()
    # The window holds the last 16 of each kind (mixed steps count as prefill), and the fit caught up.
    assert learnt.decode.steps == 16 and learnt.prefill.steps == 16 and learnt.steps_fitted == 82
    assert learnt.decode.mean_relative_error < 0.05 and learnt.prefill.mean_relative_error < 0.05
    # A re-profiled worker gets a new fitter: its report starts empty again.
    assert CostFitter(fitter.model()).report().steps_fitted == 0


def test_fit_error_does_not_count_steps_without_a_timing() -> None:
    fitter = CostFitter(CostModel())
    fitter.observe(StepTiming("decode", 0.0, 1, 10))
    fitter.observe(StepTiming("decode", float("nan"), 1, 10))
    fitter.observe(StepTiming("prefill", 0.01, 0))
    assert fitter.report().steps_fitted == 0
