"""Scheduler and worker child processes (``python -m layerkv scheduler|worker``) and fleets of them.

Every helper talks to the services only through their real gRPC APIs. A process can be killed
(SIGKILL), paused (SIGSTOP), resumed and restarted with the same command line, for fault tests.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from common.proto.layerkv.v1 import admin_pb2, admin_pb2_grpc
from common.security import bearer_metadata
from layerkv.testing.ports import free_port
from layerkv.testing.signals import ChildProcess

REPO_ROOT = Path(__file__).resolve().parent.parent.parent
TINY = "tiny-llama"


@dataclass
class ServiceProcess(ChildProcess):
    """A ``layerkv scheduler`` or ``layerkv worker`` child process."""

    name: str
    argv: list[str]
    port: int
    log_path: Path
    proc: subprocess.Popen[bytes] | None = None
    extra_env: dict[str, str] = field(default_factory=dict)

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def start(self) -> ServiceProcess:
        # One compute thread per process: the test machine has few cores and runs several workers.
        env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1", **self.extra_env)
        env["PYTHONPATH"] = str(REPO_ROOT) + os.pathsep + env.get("PYTHONPATH", "")
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "layerkv", *self.argv],
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=env,
                cwd=REPO_ROOT,
            )
        return self

    def log_tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def wait_serving(
        self,
        timeout_s: float = 120.0,
        credentials: grpc.ChannelCredentials | None = None,
        server_name: str = "",
    ) -> None:
        """Until the gRPC health service answers SERVING (fails with the log when the process dies)."""
        deadline = time.monotonic() + timeout_s
        options = [("grpc.ssl_target_name_override", server_name)] if server_name else []
        while time.monotonic() < deadline:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited with {self.proc.returncode}:\n{self.log_tail()}")
            channel = (
                grpc.secure_channel(self.address, credentials, options=options)
                if credentials
                else grpc.insecure_channel(self.address)
            )
            with channel:
                try:
                    reply = health_pb2_grpc.HealthStub(channel).Check(
                        health_pb2.HealthCheckRequest(), timeout=1
                    )
                    if reply.status == health_pb2.HealthCheckResponse.SERVING:
                        return
                except grpc.RpcError:
                    pass
            time.sleep(0.1)
        raise RuntimeError(f"{self.name} not serving after {timeout_s} s:\n{self.log_tail()}")

    def stop(self, timeout_s: float = 15.0) -> int | None:
        """SIGTERM, then SIGKILL after ``timeout_s``; the exit code."""
        if self.proc is None or self.proc.poll() is not None:
            return None if self.proc is None else self.proc.returncode
        self.proc.send_signal(signal.SIGCONT)  # a stopped process cannot act on SIGTERM
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait()


def worker_process(
    tmp: Path,
    name: str,
    *extra: str,
    scheduler: str = "",
    gpu_blocks: int = 512,
    host_blocks: int = 512,
    port: int = 0,
) -> ServiceProcess:
    port = port or free_port()
    argv = [
        "worker",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--metrics-port",
        "0",
        "--worker-id",
        name,
        "--model",
        TINY,
        "--device",
        "cpu",
        "--dtype",
        "float32",
        "--gpu-blocks",
        str(gpu_blocks),
        "--host-blocks",
        str(host_blocks),
        "--advertise-address",
        f"127.0.0.1:{port}",
        # Most fleets test behaviour, not timing: skip the start-up profile (a later --profile in
        # ``extra`` wins).
        "--profile",
        "off",
        *extra,
    ]
    if scheduler:
        argv += ["--scheduler", scheduler]
    return ServiceProcess(name, argv, port, tmp / f"{name}.log")


def scheduler_process(
    tmp: Path, redis_url: str, *extra: str, workers: Sequence[str] = (), port: int = 0, prefix: str = ""
) -> ServiceProcess:
    port = port or free_port()
    argv = [
        "scheduler",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--metrics-port",
        "0",
        "--redis-url",
        redis_url,
        "--redis-prefix",
        prefix or f"t{port}",
        *extra,
    ]
    if workers:
        argv += ["--workers", ",".join(workers)]
    return ServiceProcess("scheduler", argv, port, tmp / "scheduler.log")


def wait_workers_healthy(
    address: str,
    expected: int,
    timeout_s: float = 60.0,
    admin_token: str = "",
    channel: grpc.Channel | None = None,
) -> list[admin_pb2.WorkerInfo]:
    """Until the scheduler's ListWorkers reports ``expected`` healthy workers."""
    own = channel is None
    ch = channel if channel is not None else grpc.insecure_channel(address)
    stub = admin_pb2_grpc.AdminServiceStub(ch)
    deadline = time.monotonic() + timeout_s
    last: list[admin_pb2.WorkerInfo] = []
    try:
        while time.monotonic() < deadline:
            try:
                reply = stub.ListWorkers(
                    admin_pb2.ListWorkersRequest(), timeout=2, metadata=bearer_metadata(admin_token)
                )
                last = list(reply.workers)
                if sum(w.healthy for w in last) >= expected:
                    return last
            except grpc.RpcError:
                pass
            time.sleep(0.1)
    finally:
        if own:
            ch.close()
    raise RuntimeError(
        f"scheduler {address} has {sum(w.healthy for w in last)} healthy workers, wanted {expected}: {last}"
    )


@dataclass
class Fleet:
    """A scheduler and its workers, each a real process."""

    scheduler: ServiceProcess
    workers: list[ServiceProcess]

    def stop(self) -> None:
        for w in self.workers:
            w.stop()
        self.scheduler.stop()


def start_fleet(
    tmp: Path,
    redis_url: str,
    num_workers: int = 2,
    self_register: bool = True,
    scheduler_args: Sequence[str] = (),
    worker_args: Sequence[str] = (),
    gpu_blocks: int = 512,
    host_blocks: int = 512,
    healthy_timeout_s: float = 120.0,
) -> Fleet:
    """Start the scheduler and the workers side by side, then wait until all workers are healthy."""
    worker_ports = [free_port() for _ in range(num_workers)]
    sched_port = free_port()
    addresses = [] if self_register else [f"127.0.0.1:{p}" for p in worker_ports]
    scheduler = scheduler_process(tmp, redis_url, *scheduler_args, workers=addresses, port=sched_port)
    workers = [
        worker_process(
            tmp,
            f"worker-{i}",
            *worker_args,
            port=p,
            gpu_blocks=gpu_blocks,
            host_blocks=host_blocks,
            scheduler=scheduler.address if self_register else "",
        )
        for i, p in enumerate(worker_ports)
    ]
    fleet = Fleet(scheduler.start(), [w.start() for w in workers])
    try:
        for w in workers:
            w.wait_serving(healthy_timeout_s)
        scheduler.wait_serving(healthy_timeout_s)
        wait_workers_healthy(scheduler.address, num_workers, healthy_timeout_s)
    except BaseException:
        fleet.stop()
        raise
    return fleet
