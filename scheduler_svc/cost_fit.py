"""Per-worker cost model, refit online from the worker's measured step timings.

A worker describes itself with a profiled ``CostModel``; the scheduler keeps one ``CostFitter`` per
worker and feeds it every step report. Prefill keeps the profiled shape and fits only the paper's
correction factor ``a`` (an exponentially weighted ratio measured / predicted). A decode step is
fitted by recursive least squares with forgetting over (1, batch, context, bytes loaded), starting
from the profile (the profile is the prior, so a feature that never varies keeps its profiled
coefficient). The device-to-host bandwidth is estimated from prefills that offloaded KV. A mixed
step (chunked prefill: prompt chunks and decodes in one batch) is split: its decodes are charged
at the current decode fit and the rest of its time is a prefill sample of its prompt tokens.
Each step is first predicted by the fit as it stands, so ``report()`` gives the fit's honest
(one-step-ahead) mean relative error over a recent window of steps, per kind. A re-profiled worker
gets a new fitter: the fit restarts from the new profile. Pure Python: no torch, no numpy.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass, replace

from pydantic import BaseModel, ConfigDict, Field

from common.errors import InvalidArgument
from common.types import CostModel

# Decode features are scaled to order one so that the least-squares covariance stays well
# conditioned: context in units of 1024 tokens, host-to-device bytes in units of 100 MB.
_CONTEXT_SCALE = 1024.0
_BYTES_SCALE = 1e8
# A prediction re-solves the decode fit itself once this many decode steps came in unsolved.
_RESOLVE_AFTER = 8


@dataclass(frozen=True)
class StepTiming:
    """One measured engine step, as reported by the worker (``StepReport`` plus the batch state)."""

    kind: str  # "prefill", "decode" or "mixed"
    duration_s: float  # wall time of the step
    num_tokens: int  # prompt tokens of a prefill step; requests in a decode step
    context_tokens: int = 0  # decode: context tokens of all requests in the batch
    bytes_offloaded: int = 0  # device-to-host bytes copied during the step
    bytes_loaded: int = 0  # host-to-device bytes copied during the step
    copy_wait_s: float = 0.0  # time the compute stream waited for copies
    num_prefill_tokens: int = 0  # mixed: prompt tokens of the step's chunks
    num_decode_requests: int = 0  # mixed: requests decoding in the step


class CostFitParams(BaseModel):
    """How fast the fitted model follows new measurements."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    correction_alpha: float = Field(
        default=0.2, gt=0.0, le=1.0, description="EWMA weight of a new prefill ratio"
    )
    min_ratio: float = Field(
        default=0.05, gt=0.0, description="measured/predicted prefill ratios below are outliers"
    )
    max_ratio: float = Field(
        default=20.0, gt=1.0, description="measured/predicted prefill ratios above are outliers"
    )
    decode_forgetting: float = Field(
        default=0.98, gt=0.5, le=1.0, description="forgetting factor of decode steps (1 = never forget)"
    )
    bandwidth_alpha: float = Field(
        default=0.2, gt=0.0, le=1.0, description="EWMA weight of a new bandwidth sample"
    )
    error_window: int = Field(
        default=64, ge=1, le=100_000, description="recent steps of each kind the reported error averages"
    )


@dataclass(frozen=True)
class FitError:
    """Prediction error of one kind of step over the recent window."""

    steps: int  # steps in the window
    mean_relative_error: float  # mean |predicted - measured| / measured (0 with no steps)


@dataclass(frozen=True)
class FitReport:
    """How well the fit predicts a worker's steps (``layerkv workers`` shows it)."""

    decode: FitError
    prefill: FitError  # prefill and mixed steps
    window: int  # most steps of each kind the window holds
    steps_fitted: int  # steps observed since the fit (re)started from the profile


def _error(window: deque[float]) -> FitError:
    return FitError(len(window), sum(window) / len(window) if window else 0.0)


class CostFitter:
    """The online fit of one worker's cost model (soft state: a restart starts from the profile)."""

    def __init__(self, profile: CostModel, params: CostFitParams | None = None) -> None:
        self.profile = profile
        self.params = params if params is not None else CostFitParams()
        self.correction = profile.correction
        self.d2h_bytes_per_s = profile.d2h_bytes_per_s
        self.prefill_samples = 0
        self.decode_samples = 0
        # Decode: exponentially weighted least squares over the scaled features
        # (1, batch, context/1024, bytes/1e8), regularised toward the profile. The prior's precision
        # is never forgotten, so a direction the data does not excite (a batch size that never
        # changes) stays at its profiled value instead of drifting.
        self._prior = [
            profile.decode_base_s,
            profile.decode_per_request_s,
            profile.decode_per_context_token_s * _CONTEXT_SCALE,
            _BYTES_SCALE / profile.h2d_bytes_per_s,
        ]
        # Prior standard deviation: ten times the profiled value and at least ten profiled steps,
        # in units of the measurement noise (taken as 5 % of a profiled step).
        step = max(profile.decode_base_s, 1e-4)
        noise_s = 0.05 * step
        self._prior_precision = [(noise_s / (10.0 * max(abs(v), step))) ** 2 for v in self._prior]
        self._xtx = [[0.0] * 4 for _ in range(4)]  # sum of w x x^T
        self._xty = [0.0] * 4  # sum of w x y
        self._theta: list[float] | None = list(self._prior)  # cached solution; None when stale
        self._solved = list(self._prior)  # the last solution, stale or not (predictions use it)
        self._unsolved_decodes = 0  # decode steps folded in since the last solve
        self._errors = {kind: deque[float](maxlen=self.params.error_window) for kind in ("decode", "prefill")}
        self.steps_fitted = 0
        self._model: tuple[tuple[list[float], float, float], CostModel] | None = None  # model() cache

    def report(self) -> FitReport:
        return FitReport(_error(self._errors["decode"]), _error(self._errors["prefill"]),
                         self.params.error_window, self.steps_fitted)

    def _record_error(self, kind: str, predicted_s: float, measured_s: float) -> None:
        self._errors[kind].append(abs(predicted_s - measured_s) / measured_s)
        self.steps_fitted += 1

    def observe(self, step: StepTiming) -> None:
        """Fold one step's measurement into the fit; steps with no useful timing are ignored."""
        if step.kind not in ("prefill", "decode", "mixed"):
            raise InvalidArgument(f"step kind must be 'prefill', 'decode' or 'mixed', got {step.kind!r}")
        if not (math.isfinite(step.duration_s) and step.duration_s > 0.0):
            return
        if step.kind == "mixed":
            if step.num_prefill_tokens > 0:
                self._record_error("prefill", self.predict(step), step.duration_s)
            self._observe_mixed(step)
            return
        if step.num_tokens <= 0:
            return
        self._record_error(step.kind, self.predict(step), step.duration_s)
        if step.kind == "prefill":
            self._observe_prefill(step)
        else:
            self._observe_decode(step)

    def predict(self, step: StepTiming) -> float:
        """The step's time as the fit last solved predicts it: what the policies charged for it.

        The decode coefficients are those of the last solve (a round's snapshot solves them), not
        re-solved per step, which would double the fit's cost on the scheduler's event path; they
        are re-solved here only when no round did for ``_RESOLVE_AFTER`` decode steps (a stretch of
        decodes with nothing waiting), so the error stays that of a current fit."""
        if self._theta is None and self._unsolved_decodes >= _RESOLVE_AFTER:
            self._decode_coefficients()
        base, per_request, per_context, per_bytes = self._solved

        def decode_s(batch: int) -> float:
            return (base + per_request * batch + per_context * step.context_tokens / _CONTEXT_SCALE
                    + per_bytes * step.bytes_loaded / _BYTES_SCALE)

        def prefill_s(n: int) -> float:
            p = self.profile
            raw = p.prefill_base_s + p.prefill_per_token_s * n + p.prefill_per_token2_s * n * n
            return self.correction * raw

        if step.kind == "decode":
            return decode_s(step.num_tokens)
        if step.kind == "mixed":
            return decode_s(step.num_decode_requests) + prefill_s(step.num_prefill_tokens)
        return prefill_s(step.num_tokens)

    def _observe_mixed(self, step: StepTiming) -> None:
        # The decodes cost what the decode fit says (their context and loads are the step's); what
        # remains is the prefill of the chunks. Only that part is learnt: the split is a model, and
        # refitting decode from it would feed the prefill's error back into the decode fit.
        if step.num_prefill_tokens <= 0:
            return
        model = self.model()
        decode_s = model.decode_step_s(step.num_decode_requests, step.context_tokens, step.bytes_loaded)
        prefill_s = step.duration_s - decode_s
        if prefill_s > 0.0:
            chunks = replace(step, kind="prefill", duration_s=prefill_s, num_tokens=step.num_prefill_tokens)
            self._observe_prefill(chunks)

    def _observe_prefill(self, step: StepTiming) -> None:
        if step.bytes_offloaded > 0:
            self._observe_offload(step)
        raw = replace(self.profile, correction=1.0).prefill_s(step.num_tokens)
        if raw <= 0.0:
            return
        ratio = step.duration_s / raw
        if not self.params.min_ratio <= ratio <= self.params.max_ratio:
            return  # a stall or a clock glitch, not the model being wrong
        alpha = self.params.correction_alpha if self.prefill_samples else 1.0
        self.correction += alpha * (ratio - self.correction)
        self.prefill_samples += 1

    def _observe_offload(self, step: StepTiming) -> None:
        # Copies run beside the compute. If compute waited for them, the copies took about the
        # whole step: that is a bandwidth sample. If not, they hid under it, so the link is at least
        # that fast: raise the estimate to that lower bound only.
        sample = step.bytes_offloaded / step.duration_s
        if step.copy_wait_s > 0.0:
            self.d2h_bytes_per_s += self.params.bandwidth_alpha * (sample - self.d2h_bytes_per_s)
        else:
            self.d2h_bytes_per_s = max(self.d2h_bytes_per_s, sample)

    def _observe_decode(self, step: StepTiming) -> None:
        x = [
            1.0,
            float(step.num_tokens),
            step.context_tokens / _CONTEXT_SCALE,
            step.bytes_loaded / _BYTES_SCALE,
        ]
        lam = self.params.decode_forgetting
        for i in range(4):
            self._xty[i] = lam * self._xty[i] + x[i] * step.duration_s
            for j in range(4):
                self._xtx[i][j] = lam * self._xtx[i][j] + x[i] * x[j]
        self._theta = None
        self._unsolved_decodes += 1
        self.decode_samples += 1

    def _decode_coefficients(self) -> list[float]:
        """Regularised least squares with non-negative coefficients (small active-set loop)."""
        if self._theta is not None:
            return self._theta
        fixed: set[int] = set()  # coefficients pinned to zero
        while True:
            free = [i for i in range(4) if i not in fixed]
            a = [
                [self._xtx[i][j] + (self._prior_precision[i] if i == j else 0.0) for j in free] for i in free
            ]
            b = [self._xty[i] + self._prior_precision[i] * self._prior[i] for i in free]
            solved = _solve(a, b)
            theta = [0.0] * 4
            for i, v in zip(free, solved, strict=True):
                theta[i] = v
            negative = [i for i in free if theta[i] < 0.0]
            if not negative:
                break
            # A negative time per unit is noise around zero: pin the most negative one and refit
            # the rest, so the remaining coefficients still explain the measurements together.
            fixed.add(min(negative, key=lambda i: theta[i]))
        self._theta = self._solved = theta
        self._unsolved_decodes = 0
        return theta

    def model(self) -> CostModel:
        """The current fit, as the cost-model record policies read (built again only when the
        fit changed: a round reads it for every worker)."""
        theta = self._decode_coefficients()
        key = (theta, self.correction, self.d2h_bytes_per_s)
        if self._model is not None and self._model[0] == key:
            return self._model[1]
        base, per_request, per_context, per_bytes = theta
        h2d = _BYTES_SCALE / per_bytes if per_bytes > 0.0 else self.profile.h2d_bytes_per_s
        model = replace(
            self.profile,
            correction=self.correction,
            d2h_bytes_per_s=self.d2h_bytes_per_s,
            decode_base_s=base,
            decode_per_request_s=per_request,
            decode_per_context_token_s=per_context / _CONTEXT_SCALE,
            h2d_bytes_per_s=h2d,
        )
        self._model = (key, model)
        return model


def _solve(a: list[list[float]], b: list[float]) -> list[float]:
    """Solve the small symmetric positive-definite system ``a x = b`` (Gaussian elimination)."""
    n = len(b)
    m = [[*row, b[i]] for i, row in enumerate(a)]
    for col in range(n):
        pivot = max(range(col, n), key=lambda r: abs(m[r][col]))
        m[col], m[pivot] = m[pivot], m[col]
        assert m[col][col] != 0.0, "regularised normal equations must be non-singular"
        for r in range(col + 1, n):
            factor = m[r][col] / m[col][col]
            for c in range(col, n + 1):
                m[r][c] -= factor * m[col][c]
    x = [0.0] * n
    for r in range(n - 1, -1, -1):
        x[r] = (m[r][n] - sum(m[r][c] * x[c] for c in range(r + 1, n))) / m[r][r]
    return x
