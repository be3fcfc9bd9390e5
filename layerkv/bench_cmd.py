"""``layerkv bench``: the same Poisson workload against several policies, with the ratios.

``--policies`` takes variants with parameters and labels (``layerkv:slack_gate=false@nogate``),
``--rates`` a request-rate sweep, and the SLOs may be multiples of the fleet's batch-1 figures
(``--tpot-slo 1.5x``: the TPOT-bound setting); the SLO violation rates of every variant at every
rate are tabulated, written to ``--json`` and plotted by ``--sweep-plot``.

The defaults are the CPU acceptance workload of the LayerKV policy (docs/benchmarks.md): the tiny
preset on one worker whose GPU tier holds only a few whole long prompts, long prompts at a rate
that saturates ``fcfs-full``. The default policies compare ``layerkv`` with ``vllm`` (vLLM v1's
admission on our engine, the baseline) and ``fcfs-full`` (the older whole-request reservation).
The bench package (grpc, rich, matplotlib) is imported inside the
command only.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Annotated

import typer

# The CPU acceptance workload (see docs/benchmarks.md, "LayerKV vs fcfs-full"): with 16-token blocks
# one tiny-llama request of 512 + up to 192 tokens needs 4 layers x 44 blocks, so a 192-block GPU
# tier admits one whole request at a time; 2 requests/s saturate fcfs-full on a 2-core CPU.
DEFAULT_POLICIES = "vllm,fcfs-full,layerkv"  # the first is the baseline of the ratios
DEFAULT_RATE = "2.0"
DEFAULT_PROMPT = "512"
DEFAULT_OUTPUT = "64:192"
DEFAULT_REQUESTS = 80
DEFAULT_GPU_BLOCKS = 192
DEFAULT_HOST_BLOCKS = 16384
DEFAULT_TTFT_SLO = "2.0"  # seconds
DEFAULT_TPOT_SLO = "0.05"


def _output_range(text: str) -> tuple[int, int]:
    lo, _, hi = text.partition(":")
    try:
        low, high = int(lo), int(hi or lo)
    except ValueError as exc:
        raise typer.BadParameter(f"output length {text!r} must be N or MIN:MAX") from exc
    if not 1 <= low <= high:
        raise typer.BadParameter(f"output length {text!r} must satisfy 1 <= MIN <= MAX")
    return low, high


def bench(
    policies: Annotated[
        str,
        typer.Option(
            help="comma-separated policy variants NAME:KEY=VALUE:...@LABEL (pairs and label optional), e.g. "
            "'vllm,layerkv:slack_gate=false@layerkv-nogate,layerkv' (VALUE is JSON or a bare word; "
            "LABEL names the variant in tables and plots); the first is the baseline"
        ),
    ] = DEFAULT_POLICIES,
    endpoint: Annotated[
        str, typer.Option(help="scheduler host:port; empty: start an embedded system per policy")
    ] = "",
    rate: Annotated[
        str,
        typer.Option(
            "--rate", "--rates", help="arrivals per second (Poisson); comma-separated: a sweep, 0.5,1,2"
        ),
    ] = DEFAULT_RATE,
    prompt_len: Annotated[
        str,
        typer.Option(help="prompt tokens: N, a sweep N1,N2,…, or lognormal:MEDIAN[:SIGMA[:MIN:MAX]]"),
    ] = DEFAULT_PROMPT,
    output_len: Annotated[str, typer.Option(help="output tokens: N or MIN:MAX (uniform)")] = DEFAULT_OUTPUT,
    num_requests: Annotated[
        int, typer.Option(min=1, help="requests per point and policy")
    ] = DEFAULT_REQUESTS,
    seed: Annotated[int, typer.Option(help="workload seed (arrivals, lengths, token ids)")] = 0,
    ttft_slo: Annotated[
        str,
        typer.Option(
            help="TTFT SLO sent with every request: seconds, or Nx = N times the batch-1 TTFT of the "
            "(first, median) prompt length"
        ),
    ] = DEFAULT_TTFT_SLO,
    tpot_slo: Annotated[
        str,
        typer.Option(
            help="TPOT SLO sent with every request: seconds, or Nx = N times the batch-1 decode step "
            "(1.5x: the TPOT-bound setting)"
        ),
    ] = DEFAULT_TPOT_SLO,
    slo_basis: Annotated[
        str,
        typer.Option(
            help="batch-1 figures of Nx SLOs: cost-model (the workers' advertised CostModel), probe "
            "(lone requests timed through the fleet before the runs), auto (cost-model when every "
            "worker advertises a profiled one, else probe)"
        ),
    ] = "auto",
    params: Annotated[
        list[str] | None, typer.Option("--params", help="policy parameters NAME=JSON (repeatable)")
    ] = None,
    workers: Annotated[int, typer.Option(min=1, help="embedded: worker processes")] = 1,
    model: Annotated[str, typer.Option(help="embedded: model of every worker")] = "tiny-llama",
    device: Annotated[str, typer.Option(help="embedded: worker device (auto, cpu, cuda)")] = "auto",
    dtype: Annotated[str, typer.Option(help="embedded: worker dtype")] = "auto",
    block_size: Annotated[int, typer.Option(min=1, help="embedded: tokens per KV block")] = 16,
    gpu_blocks: Annotated[int | None, typer.Option(help="embedded: GPU-tier blocks per worker")] = (
        DEFAULT_GPU_BLOCKS
    ),
    host_blocks: Annotated[int | None, typer.Option(help="embedded: host-tier blocks per worker")] = (
        DEFAULT_HOST_BLOCKS
    ),
    gpu_kv_gib: Annotated[
        float | None, typer.Option(help="embedded: GPU tier in GiB (replaces --gpu-blocks)")
    ] = None,
    host_kv_gib: Annotated[
        float | None, typer.Option(help="embedded: host tier in GiB (replaces --host-blocks)")
    ] = None,
    vocab_size: Annotated[int, typer.Option(min=1, help="prompt token ids are drawn below this")] = 256,
    warmup: Annotated[int, typer.Option(min=0, help="unmeasured short requests before each run")] = 2,
    timeout: Annotated[float, typer.Option(min=1.0, help="deadline of one request, seconds")] = 900.0,
    api_token: Annotated[str, typer.Option(envvar="LAYERKV_API_TOKEN", help="SchedulerService token")] = "",
    admin_token: Annotated[str, typer.Option(envvar="LAYERKV_ADMIN_TOKEN", help="AdminService token")] = "",
    json_out: Annotated[
        Path | None, typer.Option("--json", help="write machine-readable results here")
    ] = None,
    plot: Annotated[Path | None, typer.Option(help="write a PNG: TTFT vs prompt length, TTFT CDF")] = None,
    sweep_plot: Annotated[
        Path | None,
        typer.Option(help="write a PNG: SLO violations (TTFT, TPOT, either, both) against rate"),
    ] = None,
) -> None:
    """Run a Poisson workload against each policy (fresh state each) and compare them."""
    from rich.console import Console

    from common.errors import LayerKVError
    from layerkv.bench.plot import plot_points, plot_sweep
    from layerkv.bench.policy_spec import parse_policy_specs
    from layerkv.bench.render import render, render_sweep
    from layerkv.bench.report import to_jsonable
    from layerkv.bench.runner import parse_policy_params
    from layerkv.bench.session import BenchOptions, run_bench
    from layerkv.bench.slo import BASES, SloTarget
    from layerkv.bench.sweep import sweep_jsonable, sweep_rows
    from layerkv.bench.workload import parse_floats, parse_prompt_sweep
    from layerkv.embedded import EmbeddedOptions

    console = Console()
    try:
        specs = parse_policy_specs(policies, parse_policy_params(params or []))
        if slo_basis not in BASES:
            raise typer.BadParameter(f"--slo-basis {slo_basis!r} must be one of {', '.join(BASES)}")
        out_min, out_max = _output_range(output_len)
        # Explicit GiB sizes replace the default block counts.
        gpu = None if gpu_kv_gib is not None else gpu_blocks
        host = None if host_kv_gib is not None else host_blocks
        opts = BenchOptions(
            policies=specs,
            rates=parse_floats(rate, "--rate"),
            prompts=parse_prompt_sweep(prompt_len),
            num_requests=num_requests,
            output_min=out_min,
            output_max=out_max,
            seed=seed,
            ttft_slo=SloTarget.parse(ttft_slo, "--ttft-slo"),
            tpot_slo=SloTarget.parse(tpot_slo, "--tpot-slo"),
            slo_basis=slo_basis,  # type: ignore[arg-type]  # checked against BASES above
            endpoint=endpoint,
            fleet=EmbeddedOptions(
                workers=workers,
                model=model,
                device=device,
                dtype=dtype,
                block_size=block_size,
                gpu_blocks=gpu,
                host_blocks=host,
                gpu_kv_gib=gpu_kv_gib,
                host_kv_gib=host_kv_gib,
                port=0,
                metrics_port=0,
                startup_timeout_s=300.0,
            ),
            warmup=warmup,
            request_timeout_s=timeout,
            vocab_high=vocab_size,
            api_token=api_token,
            admin_token=admin_token,
        )
        points, slos = run_bench(opts, console)
    except (LayerKVError, ValueError, TimeoutError, RuntimeError) as exc:
        console.print(f"[red]error: {exc}[/red]")
        raise typer.Exit(1) from exc
    render(points, console)
    rows = sweep_rows(points)
    render_sweep(rows, console)
    if json_out is not None:
        payload = {
            "command": "layerkv bench",
            "options": _options_json(opts),
            "slos": dataclasses.asdict(slos),
            "sweep": sweep_jsonable(rows),
            "points": [to_jsonable(p) for p in points],
        }
        json_out.write_text(json.dumps(payload, indent=2))
        console.print(f"results written to {json_out}")
    if plot is not None:
        plot_points(points, plot)
        console.print(f"plot written to {plot}")
    if sweep_plot is not None:
        plot_sweep(rows, sweep_plot, title=f"TTFT ≤ {slos.ttft_s:.3g} s, TPOT ≤ {slos.tpot_s * 1000:.3g} ms")
        console.print(f"sweep plot written to {sweep_plot}")


def _options_json(opts: object) -> dict[str, object]:
    from dataclasses import asdict, is_dataclass

    assert is_dataclass(opts) and not isinstance(opts, type)
    raw = asdict(opts)
    raw["prompts"] = [p.label() for p in getattr(opts, "prompts", [])]
    raw.pop("api_token", None)
    raw.pop("admin_token", None)
    return raw


def register(app: typer.Typer) -> None:
    app.command("bench")(bench)
