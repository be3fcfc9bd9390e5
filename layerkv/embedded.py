"""The embedded default system behind ``layerkv up``: Redis, a scheduler and N workers on one host.

Every service is a child process (``layerkv scheduler`` / ``layerkv worker``), the same commands a
real deployment runs, so the embedded system exercises the real gRPC and Redis paths. Children get
their own process group (a terminal Ctrl-C reaches only this supervisor, which then stops them in
order: workers, scheduler, Redis) and die with it if it is killed (Linux parent-death signal).
Their logs go to files in a run folder that is printed, and kept when something fails.

Secure by default where it costs nothing: every process binds loopback unless ``--host`` says
otherwise, and the supervisor generates the client, admin and worker tokens (given to the children
in their environment, never on a command line) and saves the client ones where the local
``layerkv`` clients find them (``layerkv.credentials``). Ports and
the redis-server command line come from ``layerkv.testing``, shared with the tests.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from common.errors import Unavailable
from common.proto.layerkv.v1 import admin_pb2, admin_pb2_grpc
from common.security import bearer_metadata
from common.threads import threads_for
from layerkv import credentials
from layerkv.testing.ports import free_port, port_or_free, wait_tcp
from layerkv.testing.redis_server import redis_argv

_STOP_GRACE_S = 10.0
_RANDOM_PRESETS = ("tiny-llama", "llama3-8b-random")  # presets without trained weights


@dataclass(frozen=True)
class EmbeddedOptions:
    """What ``layerkv up`` was asked for."""

    workers: int = 2
    model: str = "tiny-llama"
    device: str = "auto"
    dtype: str = "auto"
    block_size: int = 16
    gpu_blocks: int | None = None
    host_blocks: int | None = None
    gpu_kv_gib: float | None = None
    host_kv_gib: float | None = None
    host: str = "127.0.0.1"
    port: int = 50051  # scheduler gRPC; taken or 0: a free port
    metrics_port: int = 9090
    http_port: int = 8000  # OpenAI-compatible API; taken or 0: a free port; negative: off
    redis_url: str = ""  # empty: start a redis-server of our own
    policy: str = ""  # empty: the scheduler's default
    prompt: str = ""  # non-empty: send it, print the answer, stop
    shown_prompt: str = ""  # what to print as the prompt (the question of a chat-templated prompt)
    max_tokens: int = 32
    startup_timeout_s: float = 180.0
    worker_args: tuple[str, ...] = ()  # more flags for every worker (they override the ones above)
    scheduler_args: tuple[str, ...] = ()  # more flags for the scheduler


def _die_with_parent() -> None:
    """In the child before exec: get SIGTERM when the supervisor dies (Linux only)."""
    with contextlib.suppress(Exception):
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


@dataclass
class Child:
    """One child process and its log file."""

    name: str
    proc: subprocess.Popen[bytes]
    log_path: Path

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""


@dataclass(frozen=True)
class FleetTokens:
    """The tokens ``layerkv up`` generates for its own processes (fresh for every run)."""

    api: str = field(default_factory=lambda: secrets.token_urlsafe(32))  # SchedulerService
    admin: str = field(default_factory=lambda: secrets.token_urlsafe(32))  # AdminService
    worker: str = field(default_factory=lambda: secrets.token_urlsafe(32))  # scheduler -> workers

    def env(self, role: str) -> dict[str, str]:
        """The ``LAYERKV_*`` variables of a child (tokens stay out of ``ps`` output)."""
        common = {"LAYERKV_ADMIN_TOKEN": self.admin, "LAYERKV_WORKER_TOKEN": self.worker}
        return {**common, "LAYERKV_API_TOKEN": self.api} if role == "scheduler" else common


@dataclass
class EmbeddedSystem:
    """The running children; ``stop`` ends them in reverse dependency order."""

    run_dir: Path
    tokens: FleetTokens = field(default_factory=FleetTokens)
    credentials_file: Path | None = None  # where the client tokens were saved
    children: list[Child] = field(default_factory=list)
    redis_url: str = ""
    scheduler_address: str = ""
    scheduler_metrics: str = ""
    http_url: str = ""  # base URL of the OpenAI-compatible API, empty when off
    workers: list[tuple[str, str]] = field(default_factory=list)  # (gRPC address, metrics URL)

    def spawn(self, name: str, argv: list[str], env_extra: dict[str, str] | None = None) -> Child:
        log_path = self.run_dir / f"{name}.log"
        env = dict(os.environ, PYTHONUNBUFFERED="1", **(env_extra or {}))
        with open(log_path, "wb") as log:
            proc = subprocess.Popen(
                argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
                process_group=0, preexec_fn=_die_with_parent,
            )
        child = Child(name, proc, log_path)
        self.children.append(child)
        return child

    def check_alive(self) -> None:
        for c in self.children:
            code = c.proc.poll()
            if code is not None:
                raise Unavailable(
                    f"{c.name} exited with code {code}; its log ({c.log_path}):\n{c.log_tail()}"
                )

    def stop(self) -> None:
        """SIGTERM workers, then the scheduler, then Redis; SIGKILL what outlives the grace."""
        groups = [
            [c for c in self.children if c.name.startswith("worker")],
            [c for c in self.children if c.name == "scheduler"],
            [c for c in self.children if c.name == "redis"],
        ]
        for group in groups:
            for c in group:
                if c.proc.poll() is None:
                    c.proc.send_signal(signal.SIGTERM)
            for c in group:
                try:
                    c.proc.wait(_STOP_GRACE_S)
                except subprocess.TimeoutExpired:
                    c.proc.kill()
                    c.proc.wait()


def _layerkv(*args: str) -> list[str]:
    return [sys.executable, "-m", "layerkv", *args]


def start(opts: EmbeddedOptions, system: EmbeddedSystem) -> None:
    """Start every child (Redis first) and wait until the scheduler sees all workers healthy."""
    host = opts.host
    if opts.redis_url:
        system.redis_url = opts.redis_url
    else:
        redis_port = free_port(host)
        system.spawn("redis", redis_argv(redis_port, system.run_dir, host))
        system.redis_url = f"redis://{host}:{redis_port}/0"
        if not wait_tcp(host, redis_port, 15.0, system.check_alive):
            raise Unavailable(f"redis-server did not listen on {host}:{redis_port} within 15 s")

    sched_port = port_or_free(opts.port, host)
    sched_metrics = port_or_free(opts.metrics_port, host)
    system.scheduler_address = f"{host}:{sched_port}"
    system.scheduler_metrics = f"http://{host}:{sched_metrics}/metrics"
    argv = ["scheduler", "--host", host, "--port", str(sched_port), "--metrics-port", str(sched_metrics),
            "--redis-url", system.redis_url, "--redis-prefix", f"layerkv-up-{sched_port}"]
    if opts.http_port >= 0:
        http_port = port_or_free(opts.http_port, host)
        system.http_url = f"http://{host}:{http_port}/v1"
        argv += ["--http-port", str(http_port)]
    if opts.policy:
        argv += ["--policy", opts.policy]
    system.spawn("scheduler", _layerkv(*argv, *opts.scheduler_args), system.tokens.env("scheduler"))
    system.credentials_file = credentials.save(
        system.scheduler_address, credentials.Credentials(system.tokens.api, system.tokens.admin)
    )

    for i in range(opts.workers):
        port, metrics = free_port(host), free_port(host)
        wargv = ["worker", "--host", host, "--port", str(port), "--metrics-port", str(metrics),
                 "--worker-id", f"worker-{i}", "--model", opts.model, "--device", opts.device,
                 "--dtype", opts.dtype, "--block-size", str(opts.block_size),
                 "--scheduler", system.scheduler_address, "--advertise-address", f"{host}:{port}",
                 # the workers share this machine's cores with the scheduler, Redis and the clients:
                 # one core is left to those (a worker's threads waiting on a busy core stall every
                 # kernel: on 2 cores a 2-thread worker profiled its steps 3x slower), the rest is
                 # shared out among the workers
                 "--threads", str(threads_for(0, sharing=opts.workers, reserved=1))]
        for flag, value in (("--gpu-blocks", opts.gpu_blocks), ("--host-blocks", opts.host_blocks),
                            ("--gpu-kv-gib", opts.gpu_kv_gib), ("--host-kv-gib", opts.host_kv_gib)):
            if value is not None:
                wargv += [flag, str(value)]
        system.spawn(f"worker-{i}", _layerkv(*wargv, *opts.worker_args), system.tokens.env("worker"))
        system.workers.append((f"{host}:{port}", f"http://{host}:{metrics}/metrics"))

    deadline = time.monotonic() + opts.startup_timeout_s
    with grpc.insecure_channel(system.scheduler_address) as channel:
        _wait_serving(channel, system, deadline)
        _wait_workers(channel, opts.workers, system, deadline)


def forget_credentials(system: EmbeddedSystem) -> None:
    """Remove the saved client tokens (they die with this run's scheduler)."""
    if system.credentials_file is not None and system.scheduler_address:
        credentials.forget(system.scheduler_address)
        system.credentials_file = None


def _wait_serving(channel: grpc.Channel, system: EmbeddedSystem, deadline: float) -> None:
    stub = health_pb2_grpc.HealthStub(channel)
    while time.monotonic() < deadline:
        system.check_alive()
        try:
            reply = stub.Check(health_pb2.HealthCheckRequest(), timeout=1.0)
            if reply.status == health_pb2.HealthCheckResponse.SERVING:
                return
        except grpc.RpcError:
            pass
        time.sleep(0.1)
    raise Unavailable(f"the scheduler at {system.scheduler_address} was not serving in time")


def _wait_workers(channel: grpc.Channel, expected: int, system: EmbeddedSystem, deadline: float) -> None:
    stub = admin_pb2_grpc.AdminServiceStub(channel)
    healthy = 0
    while time.monotonic() < deadline:
        system.check_alive()
        try:
            reply = stub.ListWorkers(
                admin_pb2.ListWorkersRequest(), timeout=2.0, metadata=bearer_metadata(system.tokens.admin)
            )
            healthy = sum(w.healthy for w in reply.workers)
            if healthy >= expected:
                return
        except grpc.RpcError:
            pass
        time.sleep(0.2)
    raise Unavailable(f"only {healthy} of {expected} workers became healthy in time")


def _print_endpoints(system: EmbeddedSystem) -> None:
    print("LayerKV is up:", flush=True)
    print(f"  scheduler gRPC     {system.scheduler_address}")
    print(f"  scheduler metrics  {system.scheduler_metrics}")
    if system.http_url:
        print(f"  OpenAI API         {system.http_url}")
    for i, (address, metrics) in enumerate(system.workers):
        print(f"  worker-{i}           {address}  metrics {metrics}")
    print(f"  redis              {system.redis_url}")
    print(f"  logs               {system.run_dir}")
    print(f"  tokens             {system.credentials_file} (used by layerkv generate/policy/workers;")
    print("                     other clients send 'authorization: Bearer <api_token>')", flush=True)


def run_embedded(opts: EmbeddedOptions) -> int:
    """Start, serve until Ctrl-C/SIGTERM (or answer ``opts.prompt``), stop; the exit code."""
    from layerkv import remote_generate

    run_dir = Path(tempfile.mkdtemp(prefix="layerkv-up-"))
    system = EmbeddedSystem(run_dir)

    def on_sigterm(signum: int, frame: FrameType | None) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, on_sigterm)
    ok = False
    try:
        start(opts, system)
        _print_endpoints(system)
        if opts.prompt:
            if opts.model in _RANDOM_PRESETS:
                print(f"(the {opts.model} preset has random weights: its answer is noise)")
            print(f"\nPrompt: {opts.shown_prompt or opts.prompt}\nAnswer: ", end="", flush=True)
            code = remote_generate.run(system.scheduler_address, [opts.prompt], max_tokens=opts.max_tokens,
                                       api_token=system.tokens.api)
            ok = code == 0
            return code
        print(f"Try: layerkv generate --endpoint {system.scheduler_address} 'Hello'")
        if system.http_url:
            # Jupyter-style: a local fleet's token is printed for the user who started it, because
            # HTTP clients (curl, the openai SDK) cannot read the credentials file themselves.
            print(f"  or: curl {system.http_url}/completions -H 'Content-Type: application/json' "
                  f"-H 'Authorization: Bearer {system.tokens.api}' "
                  """-d '{"prompt": "Hello", "max_tokens": 16}'""")
            print(f"  or any OpenAI client: base_url={system.http_url} api_key={system.tokens.api}")
        print("Ctrl-C stops everything.", flush=True)
        while True:
            system.check_alive()
            time.sleep(0.5)
    except KeyboardInterrupt:
        ok = True
        return 0
    finally:
        print("stopping…", file=sys.stderr, flush=True)
        system.stop()
        forget_credentials(system)
        signal.signal(signal.SIGTERM, previous)
        if ok:
            shutil.rmtree(run_dir, ignore_errors=True)
        else:
            print(f"logs kept in {run_dir}", file=sys.stderr)
