"""One ``layerkv bench`` invocation: every policy variant on every workload point.

Each point (a rate and a prompt-length distribution) is generated once, so every variant gets the
same requests, and on each point the variants take turns. Without ``--endpoint`` each variant gets
its own embedded system (its own Redis, scheduler and workers, ``layerkv.embedded``), started
before the first run and stopped after the last; with ``--endpoint`` all run on that scheduler.
Before each run the policy is set again with ``SetPolicy`` on the idle scheduler (every earlier
request has finished), so the policy's own state is fresh. SLOs given as multiples of the batch-1
figures are resolved once, on the first system, before anything is measured, and every variant is
sent the same SLOs.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import shutil
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from layerkv.bench.policy_spec import PolicySpec
from layerkv.bench.report import PointResult, RequestResult, point_result
from layerkv.bench.runner import ClientConfig, batch1_times, run_workload, set_policy, wait_ready
from layerkv.bench.slo import SloBasis, Slos, SloTarget, needs_batch1, resolve_slos
from layerkv.bench.workload import BenchRequest, PromptLengths, WorkloadSpec, generate
from layerkv.embedded import EmbeddedOptions


@dataclass(frozen=True)
class BenchOptions:
    """Everything one invocation runs."""

    policies: list[PolicySpec]  # the first is the baseline of the ratios
    rates: list[float]
    prompts: list[PromptLengths]
    num_requests: int
    output_min: int
    output_max: int
    seed: int
    ttft_slo: SloTarget
    tpot_slo: SloTarget
    slo_basis: SloBasis = "auto"  # where multiples take the batch-1 figures from
    probe_output_tokens: int = 32  # output of each batch-1 probe request
    endpoint: str = ""  # empty: an embedded system per policy
    # the embedded system each policy runs on when no endpoint is given (its policy is set per run)
    fleet: EmbeddedOptions = field(
        default_factory=lambda: EmbeddedOptions(workers=1, port=0, metrics_port=0, startup_timeout_s=300.0)
    )
    warmup: int = 2  # short requests sent (unmeasured) before each policy's run
    request_timeout_s: float = 900.0
    vocab_high: int = 256
    api_token: str = ""
    admin_token: str = ""


@dataclass(frozen=True)
class _Point:
    rate: float
    prompt: PromptLengths
    requests: list[BenchRequest]


def _points(opts: BenchOptions) -> list[_Point]:
    return [
        _Point(
            rate,
            prompt,
            generate(
                WorkloadSpec(
                    rate=rate,
                    num_requests=opts.num_requests,
                    prompt=prompt,
                    output_min=opts.output_min,
                    output_max=opts.output_max,
                    seed=opts.seed,
                    vocab_high=opts.vocab_high,
                )
            ),
        )
        for rate in opts.rates
        for prompt in opts.prompts
    ]


def run_bench(opts: BenchOptions, console: Console) -> tuple[list[PointResult], Slos]:
    """Every variant on every point; the points' results and the SLOs they were measured against."""
    points = _points(opts)
    with contextlib.ExitStack() as systems:
        # Every variant's system is up before the first run, and the variants take turns on each
        # point: a machine whose load drifts then shifts them alike, not one variant's rates.
        endpoints = [systems.enter_context(_system_for(opts, spec, console)) for spec in opts.policies]
        slos = _resolve_slos(opts, endpoints[0], opts.policies[0], console)
        out: list[PointResult] = []
        for point in points:
            measured: dict[str, list[RequestResult]] = {}
            for spec, endpoint in zip(opts.policies, endpoints, strict=True):
                label = f"{spec.label}  rate {point.rate:g}/s  prompt {point.prompt.label()}"
                measured[spec.label] = _measure(opts, slos, endpoint, spec, point.requests, label, console)
            out.append(point_result(point.rate, point.prompt.label(), measured, slos.ttft_s, slos.tpot_s))
    return out, slos


def _resolve_slos(opts: BenchOptions, endpoint: str, spec: PolicySpec, console: Console) -> Slos:
    """The invocation's SLOs; multiples are taken of the batch-1 figures under the first variant
    (the baseline), for the first prompt point's (median) length."""
    if not needs_batch1(opts.ttft_slo, opts.tpot_slo):
        return resolve_slos(opts.ttft_slo, opts.tpot_slo, None)
    config = _client(opts, endpoint, ttft_slo_s=600.0, tpot_slo_s=600.0)  # the probe must not be gated
    prompt_tokens = opts.prompts[0].tokens

    async def run() -> Slos:
        await wait_ready(config)
        await set_policy(config, spec.name, spec.params)
        # Before any other request: the scheduler's online fit has not yet moved the advertised
        # cost model away from the workers' own (the probe warms up by itself).
        b1 = await batch1_times(
            config,
            opts.slo_basis,
            prompt_tokens,
            probe_output_tokens=opts.probe_output_tokens,
            vocab_high=opts.vocab_high,
            seed=opts.seed,
        )
        return resolve_slos(opts.ttft_slo, opts.tpot_slo, b1)

    slos = asyncio.run(run())
    from layerkv.bench.render import render_slos

    render_slos(slos, console)
    return slos


_START_ATTEMPTS = 3  # a child that loses the race for a free port to another process fails its start


@contextlib.contextmanager
def _system_for(opts: BenchOptions, spec: PolicySpec, console: Console) -> Iterator[str]:
    """The endpoint to run ``spec`` on, with fresh state; stops what it started."""
    if opts.endpoint:
        yield opts.endpoint
        return
    from common.errors import Unavailable
    from layerkv.embedded import EmbeddedSystem, forget_credentials, start

    f = opts.fleet
    what = f"{spec.label} ({f.workers} worker(s), {f.model})"
    for attempt in range(1, _START_ATTEMPTS + 1):
        run_dir = Path(tempfile.mkdtemp(prefix="layerkv-bench-"))
        system = EmbeddedSystem(run_dir)
        console.print(f"[dim]starting an embedded system for {what}…[/dim]")
        try:
            start(dataclasses.replace(f, policy=spec.name), system)
            break
        except Unavailable as exc:
            system.stop()
            forget_credentials(system)
            if attempt == _START_ATTEMPTS:
                console.print(f"[red]the embedded system's logs are kept in {run_dir}[/red]")
                raise
            # Ports are picked free and bound by the children later; another process may take one.
            first_line = str(exc).splitlines()[0]
            console.print(f"[yellow]start failed ({first_line}); retrying with new ports[/yellow]")
            shutil.rmtree(run_dir, ignore_errors=True)
    ok = False
    try:
        yield system.scheduler_address
        ok = True
    finally:
        system.stop()
        forget_credentials(system)
        if ok:
            shutil.rmtree(run_dir, ignore_errors=True)
        else:
            console.print(f"[red]the embedded system's logs are kept in {run_dir}[/red]")


def _client(opts: BenchOptions, endpoint: str, ttft_slo_s: float, tpot_slo_s: float) -> ClientConfig:
    from layerkv import credentials

    saved = credentials.load(endpoint)  # an embedded system's generated tokens
    return ClientConfig(
        endpoint=endpoint,
        ttft_slo_s=ttft_slo_s,
        tpot_slo_s=tpot_slo_s,
        request_timeout_s=opts.request_timeout_s,
        api_token=opts.api_token or saved.api_token,
        admin_token=opts.admin_token or saved.admin_token,
    )


async def _warm(opts: BenchOptions, config: ClientConfig) -> None:
    warm = [BenchRequest(i, 0.0, tuple(range(1, 17)), 4) for i in range(opts.warmup)]
    for req in warm:  # one at a time: warm the code paths, not the queue
        await run_workload(config, [req])


def _measure(
    opts: BenchOptions,
    slos: Slos,
    endpoint: str,
    spec: PolicySpec,
    requests: Sequence[BenchRequest],
    label: str,
    console: Console,
) -> list[RequestResult]:
    config = _client(opts, endpoint, slos.ttft_s, slos.tpot_s)

    async def run() -> list[RequestResult]:
        await wait_ready(config)
        await set_policy(config, spec.name, spec.params)
        await _warm(opts, config)
        with Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            console=console,
            transient=False,
        ) as progress:
            task = progress.add_task(label, total=len(requests))
            return await run_workload(config, requests, on_done=lambda _r: progress.advance(task))

    return asyncio.run(run())
