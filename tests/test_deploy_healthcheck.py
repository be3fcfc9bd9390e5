"""The images' health check script (deploy/docker/healthcheck.py) against a real gRPC server with the
standard health service: plaintext (Docker HEALTHCHECK) and mutual TLS (the chart's exec probe when
TLS is on), with certificates made in the test by a throw-away CA.
"""

from __future__ import annotations

import datetime
import importlib.util
import os
import subprocess
import sys
from collections.abc import Iterator
from concurrent import futures
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

SCRIPT = Path(__file__).resolve().parent.parent / "deploy" / "docker" / "healthcheck.py"
WORKER_NAME = "lkv-layerkv-workers-0.lkv-layerkv-workers.serving.svc.cluster.local"


def load_script() -> ModuleType:
    spec = importlib.util.spec_from_file_location("layerkv_healthcheck", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


healthcheck = load_script()


@dataclass
class Server:
    port: int
    health: health.HealthServicer


def start_server(credentials: grpc.ServerCredentials | None = None) -> tuple[grpc.Server, Server]:
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    if credentials is None:
        port = server.add_insecure_port("127.0.0.1:0")
    else:
        port = server.add_secure_port("127.0.0.1:0", credentials)
    server.start()
    return server, Server(port, servicer)


@pytest.fixture
def plain() -> Iterator[Server]:
    server, handle = start_server()
    yield handle
    server.stop(None)


def test_serving_and_not_serving(plain: Server) -> None:
    plain.health.set("", health_pb2.HealthCheckResponse.SERVING)
    assert healthcheck.check(plain.port, env={})
    plain.health.set("", health_pb2.HealthCheckResponse.NOT_SERVING)
    assert not healthcheck.check(plain.port, env={})


def test_no_server_is_unhealthy(plain: Server) -> None:
    # A port that was just freed: nothing listens there.
    server, handle = start_server()
    server.stop(None)
    assert not healthcheck.check(handle.port, env={}, timeout_s=1.0)


def test_script_exit_status_reads_the_port_from_the_environment(plain: Server) -> None:
    plain.health.set("", health_pb2.HealthCheckResponse.SERVING)
    env = {k: v for k, v in os.environ.items() if not k.startswith("LAYERKV_")}
    ok = subprocess.run(
        [sys.executable, str(SCRIPT)],
        env={**env, "LAYERKV_PORT": str(plain.port)},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert ok.returncode == 0, ok.stderr
    plain.health.set("", health_pb2.HealthCheckResponse.NOT_SERVING)
    bad = subprocess.run(
        [sys.executable, str(SCRIPT), "--port", str(plain.port)],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert bad.returncode == 1 and "NOT_SERVING" in bad.stderr


# --- TLS -----------------------------------------------------------------------------------------


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def make_ca() -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name("test-ca"))
        .issuer_name(_name("test-ca"))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=1))
        .not_valid_after(now + datetime.timedelta(hours=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    return cert, key


def issue(
    ca: tuple[x509.Certificate, ec.EllipticCurvePrivateKey], cn: str, dns: list[str]
) -> tuple[bytes, bytes]:
    """A leaf certificate (PEM cert, PEM key) for server and client use."""
    ca_cert, ca_key = ca
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(cn))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=1))
        .not_valid_after(now + datetime.timedelta(hours=1))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(d) for d in dns]), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    return cert.public_bytes(serialization.Encoding.PEM), _pem_key(key)


@dataclass
class TlsFixture:
    server: Server
    env: dict[str, str]  # what the chart gives the worker container


@pytest.fixture
def mtls_worker(tmp_path: Path) -> Iterator[TlsFixture]:
    """A server like a worker with mutual TLS: a wildcard certificate for the headless Service,
    client certificates signed by the CA required."""
    ca = make_ca()
    ca_pem = ca[0].public_bytes(serialization.Encoding.PEM)
    cert, key = issue(ca, "layerkv-worker", ["*.lkv-layerkv-workers.serving.svc.cluster.local"])
    credentials = grpc.ssl_server_credentials(
        [(key, cert)], root_certificates=ca_pem, require_client_auth=True
    )
    server, handle = start_server(credentials)
    handle.health.set("", health_pb2.HealthCheckResponse.SERVING)
    for name, data in [("ca.crt", ca_pem), ("tls.crt", cert), ("tls.key", key)]:
        (tmp_path / name).write_bytes(data)
    env = {
        "LAYERKV_TLS_CA": str(tmp_path / "ca.crt"),
        "LAYERKV_TLS_CERT": str(tmp_path / "tls.crt"),
        "LAYERKV_TLS_KEY": str(tmp_path / "tls.key"),
        "LAYERKV_ADVERTISE_ADDRESS": f"{WORKER_NAME}:50061",
    }
    yield TlsFixture(handle, env)
    server.stop(None)


def test_mutual_tls_probe_uses_the_pods_own_certificate(mtls_worker: TlsFixture) -> None:
    # The server name comes from the advertised address, although the probe dials loopback.
    assert healthcheck.check(mtls_worker.server.port, env=mtls_worker.env)
    explicit = {
        **mtls_worker.env,
        "LAYERKV_ADVERTISE_ADDRESS": "",
        "HEALTHCHECK_TLS_SERVER_NAME": WORKER_NAME,
    }
    assert healthcheck.check(mtls_worker.server.port, env=explicit)


def test_tls_probe_fails_on_wrong_name_or_plaintext(mtls_worker: TlsFixture) -> None:
    wrong_name = {**mtls_worker.env, "HEALTHCHECK_TLS_SERVER_NAME": "other.example.internal"}
    assert not healthcheck.check(mtls_worker.server.port, env=wrong_name, timeout_s=2.0)
    assert not healthcheck.check(mtls_worker.server.port, env={}, timeout_s=2.0)
