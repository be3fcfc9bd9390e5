"""``layerkv scheduler`` (the fleet brain) and the operator commands ``layerkv policy list|get|set``
and ``layerkv workers``. The scheduler's options are generated from ``SchedulerSettings``
(every one also an environment variable, docs/cli-contract.md)."""

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
    from layerkv import credentials

    token = token or credentials.load(endpoint).admin_token  # the one `layerkv up` saved, if any

    async def run() -> T:
        async with open_channel(endpoint, ca=ca) as channel:
            try:
                return await call(admin_pb2_grpc.AdminServiceStub(channel), bearer_metadata(token))
            except grpc.aio.AioRpcError as err:
                raise error_from_rpc(err) from err

    return asyncio.run(run())


def _run_scheduler(values: dict[str, Any]) -> None:
    from common.config import SchedulerSettings
    from common.logging_setup import setup_logging

    try:
        settings = SchedulerSettings.build(**values)
        setup_logging(settings.log_level)
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


workers_app = typer.Typer(
    help="List the scheduler's workers; `drain`/`undrain` stop and resume dispatching to one; `profile` "
    "re-measures an idle worker's cost model.",
    invoke_without_command=True,
)


@workers_app.callback()
def workers_cmd(
    ctx: typer.Context,
    endpoint: Endpoint = "127.0.0.1:50051",
    admin_token: AdminToken = "",
    tls_ca: TlsCa = "",
    as_json: Annotated[bool, typer.Option("--json", help="print JSON instead of a table")] = False,
) -> None:
    """The scheduler's workers: model, KV blocks per tier, running requests, health, and the cost
    model: how it was profiled, the batch-1 decode step as fitted online (and as profiled), and the
    fit's mean relative error on recent decode / prefill steps."""
    if ctx.invoked_subcommand is not None:
        return
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
                   "running", "state", "profile", "decode b=1 ms fit (profiled)",
                   "fit error decode/prefill"):  # fmt: skip
        table.add_column(column)
    for w in resp.workers:
        state = "draining" if w.draining else ("healthy" if w.healthy else "down")
        table.add_row(
            w.worker_id, w.address, w.model, str(w.geometry.num_layers),
            f"{w.gpu.free_blocks}/{w.gpu.total_blocks}", f"{w.host.free_blocks}/{w.host.total_blocks}",
            f"{w.reserved_gpu_blocks}/{w.reserved_host_blocks}", str(len(w.running_request_ids)), state,
            *_cost_columns(w),
        )  # fmt: skip
    Console().print(table)


def _cost_columns(w: Any) -> tuple[str, str, str]:
    """Profile source, the batch-1 decode step (current fit, and as profiled), and the fit's error."""
    from common.wire import cost_model_from_proto

    source = w.profile.source or "default"
    if source != "default":
        source += f" {w.profile.duration_s:.1f}s"
    fit = cost_model_from_proto(w.cost_model).decode_step_s(1, 0) * 1e3
    profiled = cost_model_from_proto(w.profiled_cost_model).decode_step_s(1, 0) * 1e3
    f = w.fit
    error = (f"{_percent(f.decode_error, f.decode_steps)} / {_percent(f.prefill_error, f.prefill_steps)}"
             f" (last {f.window})")
    return source, f"{fit:.2f} ({profiled:.2f})", error


def _percent(error: float, steps: int) -> str:
    return f"{error * 100:.0f}% of {steps}" if steps else "-"


WorkerId = Annotated[str, typer.Argument(help="worker id (see `layerkv workers`)")]


def _set_draining(worker_id: str, draining: bool, endpoint: str, admin_token: str, tls_ca: str) -> None:
    from common.proto.layerkv.v1 import admin_pb2

    try:
        if draining:
            resp: Any = _admin_call(endpoint, admin_token, tls_ca, lambda s, md: s.DrainWorker(
                admin_pb2.DrainWorkerRequest(worker_id=worker_id), metadata=md))  # fmt: skip
        else:
            resp = _admin_call(endpoint, admin_token, tls_ca, lambda s, md: s.UndrainWorker(
                admin_pb2.UndrainWorkerRequest(worker_id=worker_id), metadata=md))  # fmt: skip
    except LayerKVError as exc:
        raise _fail(exc) from exc
    typer.echo(f"{resp.worker.worker_id}\t{'draining' if resp.worker.draining else 'accepting'}")


@workers_app.command("drain")
def workers_drain(
    worker_id: WorkerId,
    endpoint: Endpoint = "127.0.0.1:50051",
    admin_token: AdminToken = "",
    tls_ca: TlsCa = "",
) -> None:
    """Stop dispatching to a worker; its running requests finish."""
    _set_draining(worker_id, True, endpoint, admin_token, tls_ca)


@workers_app.command("undrain")
def workers_undrain(
    worker_id: WorkerId,
    endpoint: Endpoint = "127.0.0.1:50051",
    admin_token: AdminToken = "",
    tls_ca: TlsCa = "",
) -> None:
    """Dispatch to a drained worker again."""
    _set_draining(worker_id, False, endpoint, admin_token, tls_ca)


@workers_app.command("profile")
def workers_profile(
    worker_id: WorkerId,
    endpoint: Endpoint = "127.0.0.1:50051",
    admin_token: AdminToken = "",
    tls_ca: TlsCa = "",
) -> None:
    """Re-measure an idle worker's cost model and restart the scheduler's fit from it (refused while
    the worker holds requests: drain it first and wait for them to finish)."""
    from common.cost_profile import describe_cost
    from common.proto.layerkv.v1 import admin_pb2
    from common.wire import cost_model_from_proto

    try:
        resp = _admin_call(endpoint, admin_token, tls_ca, lambda s, md: s.ProfileWorker(
            admin_pb2.ProfileWorkerRequest(worker_id=worker_id), metadata=md, timeout=900))  # fmt: skip
    except LayerKVError as exc:
        raise _fail(exc) from exc
    w = resp.worker
    typer.echo(f"{w.worker_id}\tprofiled in {w.profile.duration_s:.2f} s\t"
               f"{describe_cost(cost_model_from_proto(w.profiled_cost_model))}")


def register(app: typer.Typer) -> None:
    from layerkv.settings_cli import scheduler_specs, settings_command

    app.command("scheduler")(settings_command(
        scheduler_specs(), _run_scheduler,
        "Run the scheduler: client API, admin API, waiting queue, policies, worker fleet."))
    app.add_typer(policy_app, name="policy")
    app.add_typer(workers_app, name="workers")
