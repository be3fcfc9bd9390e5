"""One ``layerkv bench`` invocation: every workload point, every policy, fresh state for each.

For each point (a rate and a prompt-length distribution) the workload is generated once and sent
to each policy in turn. Fresh state per policy: with ``--endpoint`` the policy is swapped with
``SetPolicy`` on the idle scheduler (every earlier request has finished); without it a new
embedded system (its own Redis, scheduler and workers, ``layerkv.embedded``) is started for each
policy and stopped afterwards.
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

from layerkv.bench.report import PointResult, RequestResult, point_result
from layerkv.bench.runner import ClientConfig, run_workload, set_policy, wait_ready
from layerkv.bench.workload import BenchRequest, PromptLengths, WorkloadSpec, generate
from layerkv.embedded import EmbeddedOptions


@dataclass(frozen=True)
class BenchOptions:
    """Everything one invocation runs."""

    policies: list[str]
    rates: list[float]
    prompts: list[PromptLengths]
    num_requests: int
    output_min: int
    output_max: int
    seed: int
    ttft_slo_s: float
    tpot_slo_s: float
    endpoint: str = ""  # empty: an embedded system per policy
    # the embedded system each policy runs on when no endpoint is given (its policy is set per run)
    fleet: EmbeddedOptions = field(
        default_factory=lambda: EmbeddedOptions(workers=1, port=0, metrics_port=0, startup_timeout_s=300.0))
    policy_params: dict[str, dict[str, object]] = field(default_factory=dict)
    warmup: int = 2  # short requests sent (unmeasured) before each policy's run
    request_timeout_s: float = 900.0
    vocab_high: int = 256
    api_token: str = ""
    admin_token: str = ""


def run_bench(opts: BenchOptions, console: Console) -> list[PointResult]:
    points: list[PointResult] = []
    for rate in opts.rates:
        for prompt in opts.prompts:
            spec = WorkloadSpec(
                rate=rate,
                num_requests=opts.num_requests,
                prompt=prompt,
                output_min=opts.output_min,
                output_max=opts.output_max,
                seed=opts.seed,
                vocab_high=opts.vocab_high,
            )
            requests = generate(spec)
            results: dict[str, list[RequestResult]] = {}
            for policy in opts.policies:
                label = f"{policy}  rate {rate:g}/s  prompt {prompt.label()}"
                with _system_for(opts, policy, console) as endpoint:
                    results[policy] = _measure(opts, endpoint, policy, requests, label, console)
            points.append(point_result(rate, prompt.label(), results, opts.ttft_slo_s, opts.tpot_slo_s))
    return points


@contextlib.contextmanager
def _system_for(opts: BenchOptions, policy: str, console: Console) -> Iterator[str]:
    """The endpoint to run ``policy`` on, with fresh state; stops what it started."""
    if opts.endpoint:
        yield opts.endpoint
        return
    from layerkv.embedded import EmbeddedSystem, forget_credentials, start

    f = opts.fleet
    run_dir = Path(tempfile.mkdtemp(prefix="layerkv-bench-"))
    system = EmbeddedSystem(run_dir)
    ok = False
    console.print(f"[dim]starting an embedded system for {policy} ({f.workers} worker(s), {f.model})…[/dim]")
    try:
        start(
            dataclasses.replace(f, policy=policy),
            system,
        )
        yield system.scheduler_address
        ok = True
    finally:
        system.stop()
        forget_credentials(system)
        if ok:
            shutil.rmtree(run_dir, ignore_errors=True)
        else:
            console.print(f"[red]the embedded system's logs are kept in {run_dir}[/red]")


def _client(opts: BenchOptions, endpoint: str) -> ClientConfig:
    from layerkv import credentials

    saved = credentials.load(endpoint)  # an embedded system's generated tokens
    return ClientConfig(
        endpoint=endpoint,
        ttft_slo_s=opts.ttft_slo_s,
        tpot_slo_s=opts.tpot_slo_s,
        request_timeout_s=opts.request_timeout_s,
        api_token=opts.api_token or saved.api_token,
        admin_token=opts.admin_token or saved.admin_token,
    )


def _measure(
    opts: BenchOptions,
    endpoint: str,
    policy: str,
    requests: Sequence[BenchRequest],
    label: str,
    console: Console,
) -> list[RequestResult]:
    config = _client(opts, endpoint)

    async def run() -> list[RequestResult]:
        await wait_ready(config)
        await set_policy(config, policy, opts.policy_params.get(policy, {}))
        if opts.warmup:
            warm = [BenchRequest(i, 0.0, tuple(range(1, 17)), 4) for i in range(opts.warmup)]
            for req in warm:  # one at a time: warm the code paths, not the queue
                await run_workload(config, [req])
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
