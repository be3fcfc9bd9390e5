"""``layerkv worker`` (one worker process) and ``layerkv up`` (the embedded default system).

``layerkv up`` starts Redis (``REDIS_URL`` when set, else a ``redis-server`` of its own), one
scheduler and N workers as child processes, waits until the scheduler sees every worker healthy,
prints the endpoints and runs until Ctrl-C/SIGTERM; with ``--demo`` or ``--prompt`` it sends one
request, prints the streamed text and stops everything. torch is imported only by the worker
processes.
"""

from __future__ import annotations

from typing import Annotated

import typer

from common.errors import LayerKVError


def _env(name: str) -> str:
    return "LAYERKV_" + name.upper().replace("-", "_")


def worker(
    host: Annotated[str, typer.Option(envvar=_env("host"), help="listen address")] = "0.0.0.0",
    port: Annotated[int, typer.Option(envvar=_env("port"), help="gRPC port (0: a free one)")] = 50061,
    metrics_port: Annotated[
        int, typer.Option(envvar=_env("metrics_port"), help="Prometheus /metrics port; 0 disables")
    ] = 9091,
    worker_id: Annotated[
        str, typer.Option(envvar=_env("worker_id"), help="stable id; empty: host name:port")
    ] = "",
    model: Annotated[
        str, typer.Option(envvar=_env("model"), help="local HF folder or a preset (tiny-llama)")
    ] = "tiny-llama",
    device: Annotated[str, typer.Option(envvar=_env("device"), help="auto, cpu or cuda")] = "auto",
    dtype: Annotated[
        str, typer.Option(envvar=_env("dtype"), help="auto, float32, float16 or bfloat16")
    ] = "auto",
    block_size: Annotated[int, typer.Option(envvar=_env("block_size"), help="tokens per KV block")] = 16,
    gpu_blocks: Annotated[
        int | None, typer.Option(envvar=_env("gpu_blocks"), help="GPU-tier blocks (default: auto)")
    ] = None,
    host_blocks: Annotated[
        int | None, typer.Option(envvar=_env("host_blocks"), help="host-tier blocks (default: auto)")
    ] = None,
    staging_blocks: Annotated[
        int | None, typer.Option(envvar=_env("staging_blocks"),
                                 help="GPU staging blocks host-placed layers compute in (default: auto)")
    ] = None,
    gpu_kv_gib: Annotated[
        float | None, typer.Option(envvar=_env("gpu_kv_gib"), help="GPU tier size in GiB")
    ] = None,
    host_kv_gib: Annotated[
        float | None, typer.Option(envvar=_env("host_kv_gib"), help="host tier size in GiB")
    ] = None,
    preemption_mode: Annotated[
        str, typer.Option(envvar=_env("preemption_mode"),
                          help="when KV growth finds no room: recompute or swap-layers (dispatch default)")
    ] = "recompute",
    max_num_batched_tokens: Annotated[
        int, typer.Option(envvar=_env("max_num_batched_tokens"),
                          help="tokens per engine step: decodes first, then prefill chunks")
    ] = 2048,
    threads: Annotated[
        int, typer.Option(envvar=_env("threads"), help="torch threads; 0: the cores this process may use")
    ] = 0,
    scheduler: Annotated[
        str, typer.Option(envvar=_env("scheduler"), help="scheduler host:port to self-register with")
    ] = "",
    advertise_address: Annotated[
        str, typer.Option(envvar=_env("advertise_address"), help="address the scheduler should dial")
    ] = "",
    tls_cert: Annotated[str, typer.Option(envvar=_env("tls_cert"), help="server certificate (PEM)")] = "",
    tls_key: Annotated[str, typer.Option(envvar=_env("tls_key"), help="server private key (PEM)")] = "",
    tls_ca: Annotated[
        str, typer.Option(envvar=_env("tls_ca"), help="CA of client certificates (mutual TLS)")
    ] = "",
    scheduler_identity: Annotated[
        str, typer.Option(envvar=_env("scheduler_identity"), help="only client CN allowed to dispatch")
    ] = "",
    admin_token: Annotated[
        str, typer.Option(envvar=_env("admin_token"), help="token used when self-registering")
    ] = "",
    log_level: Annotated[str, typer.Option(envvar=_env("log_level"), help="logging level")] = "INFO",
) -> None:
    """Run one worker: a LayerKV engine behind the WorkerService gRPC API."""
    from common.config import WorkerSettings
    from common.logging_setup import setup_logging
    from worker_svc.server import serve

    setup_logging(log_level)
    try:
        settings = WorkerSettings.build(
            host=host, port=port, metrics_port=metrics_port, worker_id=worker_id, model=model,
            device=device, dtype=dtype, block_size=block_size, gpu_blocks=gpu_blocks,
            host_blocks=host_blocks, staging_blocks=staging_blocks, gpu_kv_gib=gpu_kv_gib,
            host_kv_gib=host_kv_gib, preemption_mode=preemption_mode,
            max_num_batched_tokens=max_num_batched_tokens, threads=threads, scheduler=scheduler,
            advertise_address=advertise_address,
            tls_cert=tls_cert,
            tls_key=tls_key, tls_ca=tls_ca, scheduler_identity=scheduler_identity,
            admin_token=admin_token,
        )
        serve(settings)
    except LayerKVError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from exc


def up(
    workers: Annotated[int, typer.Option("--workers", min=1, help="number of worker processes")] = 2,
    model: Annotated[str, typer.Option(envvar=_env("model"), help="model of every worker")] = "tiny-llama",
    device: Annotated[str, typer.Option(help="worker device: auto, cpu or cuda")] = "auto",
    dtype: Annotated[str, typer.Option(help="worker dtype")] = "auto",
    block_size: Annotated[int, typer.Option(help="tokens per KV block")] = 16,
    gpu_blocks: Annotated[int | None, typer.Option(help="GPU-tier blocks per worker")] = None,
    host_blocks: Annotated[int | None, typer.Option(help="host-tier blocks per worker")] = None,
    gpu_kv_gib: Annotated[float | None, typer.Option(help="GPU tier GiB per worker")] = None,
    host_kv_gib: Annotated[float | None, typer.Option(help="host tier GiB per worker")] = None,
    host: Annotated[str, typer.Option(help="listen address of every process")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="scheduler gRPC port (0: a free one)")] = 50051,
    metrics_port: Annotated[int, typer.Option(help="scheduler /metrics port (0: a free one)")] = 9090,
    redis_url: Annotated[
        str, typer.Option(envvar="REDIS_URL", help="use this Redis instead of starting one")
    ] = "",
    policy: Annotated[str, typer.Option(help="initial scheduling policy")] = "layerkv",
    demo: Annotated[bool, typer.Option("--demo", help="send one request, print the answer, stop")] = False,
    prompt: Annotated[str, typer.Option(help="send this prompt, print the answer, stop")] = "",
    max_tokens: Annotated[int, typer.Option(help="tokens to generate for --demo/--prompt")] = 32,
    startup_timeout_s: Annotated[float, typer.Option(help="give up when not ready after this")] = 180.0,
) -> None:
    """Start the embedded system: Redis, a scheduler and N workers; Ctrl-C stops everything."""
    from common.logging_setup import setup_logging
    from layerkv.embedded import EmbeddedOptions, run_embedded

    setup_logging("WARNING")
    opts = EmbeddedOptions(
        workers=workers, model=model, device=device, dtype=dtype, block_size=block_size,
        gpu_blocks=gpu_blocks, host_blocks=host_blocks, gpu_kv_gib=gpu_kv_gib, host_kv_gib=host_kv_gib,
        host=host, port=port, metrics_port=metrics_port, redis_url=redis_url, policy=policy,
        prompt=prompt or ("Hello from LayerKV!" if demo else ""), max_tokens=max_tokens,
        startup_timeout_s=startup_timeout_s,
    )
    try:
        code = run_embedded(opts)
    except LayerKVError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(1) from exc
    raise typer.Exit(code)


def register(app: typer.Typer) -> None:
    app.command("worker")(worker)
    app.command("up")(up)
