"""``layerkv scheduler`` (the fleet brain) and the operator commands ``layerkv policy list|get|set``
and ``layerkv workers``. Every flag is also an environment variable (docs/cli-contract.md)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable
from typing import Annotated, Any, TypeVar

import typer

from common.errors import InvalidArgument, LayerKVError

T = TypeVar("T")


def _env(name: str) -> str:
    return "LAYERKV_" + name.upper().replace("-", "_")


Endpoint = Annotated[str, typer.Option(envvar="LAYERKV_ENDPOINT", help="scheduler address host:port")]
AdminToken = Annotated[str, typer.Option(envvar=_env("admin_token"), help="bearer token of AdminService")]
TlsCa = Annotated[str, typer.Option(envvar="LAYERKV_CLIENT_TLS_CA", help="CA of the scheduler's certificate")]


def _fail(exc: Exception) -> typer.Exit:
    typer.echo(f"error: {exc}", err=True)
    return typer.Exit(code=1)


def _admin_call(
    endpoint: str, token: str, ca: str, call: Callable[[Any, tuple[tuple[str, str], ...]], Awaitable[T]]
) -> T:
    import grpc.aio

    from common.grpc_errors import error_from_rpc
    from common.proto.layerkv.v1 import admin_pb2_grpc
    from common.security import bearer_metadata, open_channel

    async def run() -> T:
        async with open_channel(endpoint, ca=ca) as channel:
            try:
                return await call(admin_pb2_grpc.AdminServiceStub(channel), bearer_metadata(token))
            except grpc.aio.AioRpcError as err:
                raise error_from_rpc(err) from err

    return asyncio.run(run())


def scheduler(
    host: Annotated[str, typer.Option(envvar=_env("host"), help="listen address")] = "0.0.0.0",
    port: Annotated[int, typer.Option(envvar=_env("port"), help="gRPC port (0: a free one)")] = 50051,
    metrics_port: Annotated[
        int, typer.Option(envvar=_env("metrics_port"), help="Prometheus /metrics port; 0 disables")
    ] = 9090,
    redis_url: Annotated[
        str, typer.Option(envvar=[_env("redis_url"), "REDIS_URL"], help="request state store")
    ] = "redis://127.0.0.1:6379/0",
    redis_prefix: Annotated[
        str, typer.Option(envvar=_env("redis_prefix"), help="Redis key namespace")
    ] = "layerkv",
    retention_s: Annotated[
        int, typer.Option(envvar=_env("retention_s"), help="TTL of finished request records, seconds")
    ] = 86400,
    workers: Annotated[
        str, typer.Option(envvar=_env("workers"), help="comma-separated worker addresses host:port")
    ] = "",
    workers_dns: Annotated[
        str, typer.Option(envvar=_env("workers_dns"), help="name:port of a headless Service (re-resolved)")
    ] = "",
    policy: Annotated[
        str, typer.Option(envvar=_env("policy"), help="initial policy (a policy stored in Redis wins)")
    ] = "layerkv",
    policy_params: Annotated[
        str, typer.Option(envvar=_env("policy_params"), help="initial policy parameters, JSON")
    ] = "{}",
    policy_file: Annotated[
        str,
        typer.Option(envvar=_env("policy_file"), help="YAML/JSON {name, params} file watched for changes"),
    ] = "",
    queue_limit: Annotated[
        int, typer.Option(envvar=_env("queue_limit"), help="waiting requests before RESOURCE_EXHAUSTED")
    ] = 10000,
    tls_cert: Annotated[str, typer.Option(envvar=_env("tls_cert"), help="server certificate (PEM)")] = "",
    tls_key: Annotated[str, typer.Option(envvar=_env("tls_key"), help="server private key (PEM)")] = "",
    tls_ca: Annotated[
        str,
        typer.Option(envvar=_env("tls_ca"), help="CA of the workers' certificates: mutual TLS to workers"),
    ] = "",
    admin_token: Annotated[
        str, typer.Option(envvar=_env("admin_token"), help="bearer token required on AdminService")
    ] = "",
    api_token: Annotated[
        str, typer.Option(envvar=_env("api_token"), help="bearer token required on SchedulerService")
    ] = "",
    worker_silence_s: Annotated[
        float, typer.Option(envvar=_env("worker_silence_s"), help="event stream silent this long: down")
    ] = 15.0,
    disconnect_grace_s: Annotated[
        float, typer.Option(envvar=_env("disconnect_grace_s"), help="cancel after clients left this long")
    ] = 1.0,
    log_level: Annotated[str, typer.Option(envvar=_env("log_level"), help="DEBUG, INFO, WARNING")] = "INFO",
) -> None:
    """Run the scheduler: client API, admin API, waiting queue, policies, worker fleet."""
    from common.config import SchedulerSettings
    from common.logging_setup import setup_logging

    setup_logging(log_level)
    try:
        settings = SchedulerSettings.build(
            host=host, port=port, metrics_port=metrics_port, redis_url=redis_url, redis_prefix=redis_prefix,
            retention_s=retention_s, workers=workers, workers_dns=workers_dns, policy=policy,
            policy_params=policy_params, policy_file=policy_file, queue_limit=queue_limit, tls_cert=tls_cert,
            tls_key=tls_key, tls_ca=tls_ca, admin_token=admin_token, api_token=api_token,
            worker_silence_s=worker_silence_s, disconnect_grace_s=disconnect_grace_s,
        )  # fmt: skip
        import uvloop

        from scheduler_svc.server import serve

        uvloop.run(serve(settings))
    except LayerKVError as exc:
        raise _fail(exc) from exc


policy_app = typer.Typer(
    help="Show or swap the scheduling policy of a running scheduler.", no_args_is_help=True
)


@policy_app.command("list")
def policy_list(
    endpoint: Endpoint = "127.0.0.1:50051", admin_token: AdminToken = "", tls_ca: TlsCa = ""
) -> None:
    """Policies the scheduler knows, with their default parameters."""
    from common.proto.layerkv.v1 import admin_pb2

    try:
        resp = _admin_call(endpoint, admin_token, tls_ca, lambda s, md: s.ListPolicies(
            admin_pb2.ListPoliciesRequest(), metadata=md))  # fmt: skip
    except LayerKVError as exc:
        raise _fail(exc) from exc
    from google.protobuf.json_format import MessageToDict

    for p in resp.policies:
        typer.echo(f"{p.name}\t{p.description}\tdefaults={json.dumps(MessageToDict(p.defaults))}")


@policy_app.command("get")
def policy_get(
    endpoint: Endpoint = "127.0.0.1:50051", admin_token: AdminToken = "", tls_ca: TlsCa = ""
) -> None:
    """The active policy and its parameters, as JSON."""
    from google.protobuf.json_format import MessageToDict

    from common.proto.layerkv.v1 import admin_pb2

    try:
        resp = _admin_call(endpoint, admin_token, tls_ca, lambda s, md: s.GetPolicy(
            admin_pb2.GetPolicyRequest(), metadata=md))  # fmt: skip
    except LayerKVError as exc:
        raise _fail(exc) from exc
    typer.echo(json.dumps({"name": resp.policy.name, "params": MessageToDict(resp.policy.params)}))


@policy_app.command("set")
def policy_set(
    name: Annotated[str, typer.Argument(help="policy name (see `layerkv policy list`)")],
    params: Annotated[str, typer.Option("--params", help="parameters as a JSON object")] = "{}",
    endpoint: Endpoint = "127.0.0.1:50051",
    admin_token: AdminToken = "",
    tls_ca: TlsCa = "",
) -> None:
    """Swap the policy between two scheduling rounds (workers keep running)."""
    from google.protobuf.json_format import MessageToDict

    from common.proto.layerkv.v1 import admin_pb2

    try:
        try:
            values = json.loads(params)
        except json.JSONDecodeError as exc:
            raise InvalidArgument(f"--params is not JSON: {exc}") from exc
        if not isinstance(values, dict):
            raise InvalidArgument(f"--params must be a JSON object, got {params!r}")
        spec = admin_pb2.PolicySpec(name=name)
        spec.params.update(values)
        resp = _admin_call(endpoint, admin_token, tls_ca, lambda s, md: s.SetPolicy(
            admin_pb2.SetPolicyRequest(policy=spec), metadata=md))  # fmt: skip
    except LayerKVError as exc:
        raise _fail(exc) from exc
    typer.echo(json.dumps({
        "previous": {"name": resp.previous.name, "params": MessageToDict(resp.previous.params)},
        "current": {"name": resp.current.name, "params": MessageToDict(resp.current.params)},
    }))  # fmt: skip


def workers_cmd(
    endpoint: Endpoint = "127.0.0.1:50051",
    admin_token: AdminToken = "",
    tls_ca: TlsCa = "",
    as_json: Annotated[bool, typer.Option("--json", help="print JSON instead of a table")] = False,
) -> None:
    """The scheduler's workers: model, KV blocks per tier, running requests, health."""
    from google.protobuf.json_format import MessageToDict

    from common.proto.layerkv.v1 import admin_pb2

    try:
        resp = _admin_call(endpoint, admin_token, tls_ca, lambda s, md: s.ListWorkers(
            admin_pb2.ListWorkersRequest(), metadata=md))  # fmt: skip
    except LayerKVError as exc:
        raise _fail(exc) from exc
    if as_json:
        typer.echo(json.dumps([MessageToDict(w, preserving_proto_field_name=True) for w in resp.workers]))
        return
    from rich.console import Console
    from rich.table import Table

    table = Table(title="workers")
    for column in ("id", "address", "model", "layers", "GPU free/total", "host free/total", "reserved G/H",
                   "running", "state"):  # fmt: skip
        table.add_column(column)
    for w in resp.workers:
        state = "draining" if w.draining else ("healthy" if w.healthy else "down")
        table.add_row(
            w.worker_id, w.address, w.model, str(w.geometry.num_layers),
            f"{w.gpu.free_blocks}/{w.gpu.total_blocks}", f"{w.host.free_blocks}/{w.host.total_blocks}",
            f"{w.reserved_gpu_blocks}/{w.reserved_host_blocks}", str(len(w.running_request_ids)), state,
        )  # fmt: skip
    Console().print(table)


def register(app: typer.Typer) -> None:
    app.command("scheduler")(scheduler)
    app.add_typer(policy_app, name="policy")
    app.command("workers")(workers_cmd)
