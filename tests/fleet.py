"""Test helpers for the services: in-process engines and workers, real scheduler/worker processes, PKI.

Process start-ups are the slow part (torch import), so the e2e modules share fleets per module.
Every helper talks to the services only through their real gRPC APIs and generated stubs.
"""

from __future__ import annotations

import datetime
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from common.proto.layerkv.v1 import admin_pb2, admin_pb2_grpc, types_pb2
from common.security import bearer_metadata
from common.types import SamplingParams

REPO_ROOT = Path(__file__).resolve().parent.parent
TINY = "tiny-llama"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# --- in-process engine ---------------------------------------------------------------------------


def make_engine(gpu_blocks: int = 512, host_blocks: int = 512, **overrides: Any) -> Any:
    """A tiny-llama engine on CPU (random weights, seed 0: the same weights as any worker's)."""
    from worker_svc.engine import Engine, EngineConfig

    config = EngineConfig(
        model=TINY, device="cpu", dtype="float32", gpu_blocks=gpu_blocks, host_blocks=host_blocks, **overrides
    )
    return Engine.from_config(config)


def reference_outputs(
    engine: Any, prompts: Sequence[Sequence[int]], sampling: SamplingParams
) -> list[list[int]]:
    """Greedy outputs of ``prompts`` run one at a time by an in-process engine."""
    results: list[list[int]] = []
    for i, prompt in enumerate(prompts):
        rid = f"ref-{i}-{time.monotonic_ns()}"
        engine.add_request(rid, list(prompt), sampling)
        tokens: list[int] = []
        while engine.has_work():
            for out in engine.step().outputs:
                if out.request_id == rid:
                    tokens.extend(out.new_token_ids)
        results.append(tokens)
    return results


def proto_sampling(max_tokens: int, ignore_eos: bool = True, **kw: Any) -> types_pb2.SamplingParams:
    return types_pb2.SamplingParams(max_tokens=max_tokens, ignore_eos=ignore_eos, **kw)


# --- processes -------------------------------------------------------------------------------------


@dataclass
class ServiceProcess:
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
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait()

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


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


# --- PKI -------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CertPair:
    cert: str
    key: str


@dataclass(frozen=True)
class Pki:
    """A CA, certificates it signed (scheduler, worker, client) and a rogue CA's certificate."""

    ca: str
    scheduler: CertPair  # CN "scheduler"
    worker: CertPair  # CN "worker"
    intruder: CertPair  # CN "intruder", signed by the same CA
    rogue_ca: str
    rogue: CertPair  # CN "scheduler", but signed by another CA


def make_pki(folder: Path) -> Pki:
    """Self-signed CA and leaf certificates for localhost/127.0.0.1, written as PEM files."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    folder.mkdir(parents=True, exist_ok=True)
    now = datetime.datetime.now(datetime.timezone.utc)

    def write_key(key: ec.EllipticCurvePrivateKey, path: Path) -> str:
        path.write_bytes(
            key.private_bytes(
                serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
            )
        )
        return str(path)

    def write_cert(cert: x509.Certificate, path: Path) -> str:
        path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        return str(path)

    def make_ca(name: str) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey, str]:
        key = ec.generate_private_key(ec.SECP256R1())
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
        cert = (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True,
                    key_cert_sign=True,
                    crl_sign=True,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .sign(key, hashes.SHA256())
        )
        return cert, key, write_cert(cert, folder / f"{name}.pem")

    def leaf(ca: x509.Certificate, ca_key: ec.EllipticCurvePrivateKey, cn: str, file: str) -> CertPair:
        import ipaddress

        key = ec.generate_private_key(ec.SECP256R1())
        cert = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)]))
            .issuer_name(ca.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(
                x509.SubjectAlternativeName(
                    [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
                ),
                critical=False,
            )
            .add_extension(
                x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]),
                critical=False,
            )
            .sign(ca_key, hashes.SHA256())
        )
        return CertPair(write_cert(cert, folder / f"{file}.crt"), write_key(key, folder / f"{file}.key"))

    ca, ca_key, ca_path = make_ca("test-ca")
    rogue_ca, rogue_key, rogue_path = make_ca("rogue-ca")
    return Pki(
        ca=ca_path,
        scheduler=leaf(ca, ca_key, "scheduler", "scheduler"),
        worker=leaf(ca, ca_key, "worker", "worker"),
        intruder=leaf(ca, ca_key, "intruder", "intruder"),
        rogue_ca=rogue_path,
        rogue=leaf(rogue_ca, rogue_key, "scheduler", "rogue"),
    )


def tls_credentials(ca: str, pair: CertPair | None = None) -> grpc.ChannelCredentials:
    return grpc.ssl_channel_credentials(
        root_certificates=Path(ca).read_bytes(),
        private_key=Path(pair.key).read_bytes() if pair else None,
        certificate_chain=Path(pair.cert).read_bytes() if pair else None,
    )


# --- a whole fleet ---------------------------------------------------------------------------------


class RedisProcess:
    """A real redis-server on a free port, for fleets that outlive one test (module scope)."""

    def __init__(self, folder: Path) -> None:
        from tests.conftest import _redis_binary

        self.port = free_port()
        self.proc = subprocess.Popen(
            [
                _redis_binary(),
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                str(folder),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.2):
                    return
            except OSError:
                time.sleep(0.05)
        self.proc.kill()
        raise RuntimeError(f"redis-server did not start on port {self.port}")

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=10)


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


# --- clients ---------------------------------------------------------------------------------------


@dataclass
class Streamed:
    """What a client saw of one request's stream."""

    request_id: str = ""
    token_ids: list[int] = field(default_factory=list)
    offsets: list[int] = field(default_factory=list)  # offset of each chunk (checks nothing was skipped)
    text: str = ""
    final: Any = None  # scheduler_pb2.GenerateFinal, once it came

    def take(self, msg: Any) -> None:
        """Fold one GenerateResponse/AttachResponse into the result, checking offsets are contiguous."""
        self.request_id = msg.request_id or self.request_id
        if msg.HasField("chunk"):
            chunk = msg.chunk
            assert chunk.offset == len(self.token_ids), (
                f"{self.request_id}: chunk at offset {chunk.offset}, expected {len(self.token_ids)}"
            )
            self.offsets.append(chunk.offset)
            self.token_ids.extend(chunk.token_ids)
            self.text += chunk.text_delta
        elif msg.HasField("final"):
            self.final = msg.final


def token_request(prompt: Sequence[int], max_tokens: int, request_id: str = "", **sampling: Any) -> Any:
    from common.proto.layerkv.v1 import scheduler_pb2

    return scheduler_pb2.GenerateRequest(
        request_id=request_id,
        token_ids=scheduler_pb2.TokenIds(ids=list(prompt)),
        sampling=proto_sampling(max_tokens, **sampling),
    )


async def stream_generate(
    stub: Any, request: Any, metadata: Sequence[tuple[str, str]] = (), timeout_s: float = 120.0
) -> Streamed:
    out = Streamed(request_id=request.request_id)
    async for msg in stub.Generate(request, metadata=tuple(metadata), timeout=timeout_s):
        out.take(msg)
    return out


async def stream_attach(stub: Any, request_id: str, into: Streamed, timeout_s: float = 120.0) -> Streamed:
    """Re-attach from the tokens already in ``into`` and fold the rest of the stream into it."""
    from common.proto.layerkv.v1 import scheduler_pb2

    req = scheduler_pb2.AttachRequest(request_id=request_id, offset=len(into.token_ids))
    async for msg in stub.Attach(req, timeout=timeout_s):
        into.take(msg)
    return into
