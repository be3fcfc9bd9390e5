"""TLS, mutual TLS, bearer tokens and the error→status table, with real gRPC servers and
certificates generated in the test (``cryptography``)."""

from __future__ import annotations

import datetime
import ipaddress
import logging
from dataclasses import dataclass
from pathlib import Path

import grpc
import grpc.aio
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from common import errors
from common.grpc_errors import STATUS_OF, ErrorInterceptor, error_from_status, status_of
from common.proto.layerkv.v1 import (
    admin_pb2,
    admin_pb2_grpc,
    scheduler_pb2,
    scheduler_pb2_grpc,
    worker_pb2,
    worker_pb2_grpc,
)
from common.security import TLSFiles, bearer_metadata, open_channel, warn_if_insecure
from scheduler_svc.testing.fleet import collect, generate_request, start_fleet
from scheduler_svc.testing.stub_worker import StubWorker, expected_tokens

ONE_DAY = datetime.timedelta(days=1)


@dataclass(frozen=True)
class Pki:
    ca: str
    server_cert: str
    server_key: str
    client_cert: str  # CN=scheduler, signed by the CA
    client_key: str
    rogue_cert: str  # CN=scheduler, signed by another CA
    rogue_key: str


def _key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _cert(subject: str, key, issuer_name: x509.Name, issuer_key, ca: bool, sans: list[x509.GeneralName]):
    now = datetime.datetime.now(datetime.timezone.utc)
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
        .issuer_name(issuer_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - ONE_DAY)
        .not_valid_after(now + ONE_DAY)
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    if sans:
        builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
    return builder.sign(issuer_key, hashes.SHA256())


def _write(path: Path, cert=None, key=None) -> str:
    if cert is not None:
        path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    else:
        path.write_bytes(
            key.private_bytes(
                serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
            )
        )
    return str(path)


def make_pki(root: Path) -> Pki:
    ca_key, rogue_ca_key = _key(), _key()
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "layerkv test CA")])
    rogue_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "rogue CA")])
    ca = _cert("layerkv test CA", ca_key, ca_name, ca_key, True, [])
    sans = [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
    server_key, client_key, rogue_key = _key(), _key(), _key()
    server = _cert("localhost", server_key, ca_name, ca_key, False, sans)
    client = _cert("scheduler", client_key, ca_name, ca_key, False, [x509.DNSName("scheduler")])
    rogue = _cert("scheduler", rogue_key, rogue_name, rogue_ca_key, False, [x509.DNSName("scheduler")])
    return Pki(
        ca=_write(root / "ca.pem", cert=ca),
        server_cert=_write(root / "server.pem", cert=server),
        server_key=_write(root / "server.key", key=server_key),
        client_cert=_write(root / "client.pem", cert=client),
        client_key=_write(root / "client.key", key=client_key),
        rogue_cert=_write(root / "rogue.pem", cert=rogue),
        rogue_key=_write(root / "rogue.key", key=rogue_key),
    )


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


async def test_admin_needs_the_token_and_plaintext_cannot_reach_tls(redis_url: str, pki: Pki) -> None:
    fleet = await start_fleet(
        redis_url, [StubWorker("w0")], tls_cert=pki.server_cert, tls_key=pki.server_key, admin_token="s3cret"
    )
    try:
        async with open_channel(fleet.address, ca=pki.ca, server_name="localhost") as channel:
            admin = admin_pb2_grpc.AdminServiceStub(channel)
            for metadata in ((), bearer_metadata("wrong")):
                with pytest.raises(grpc.aio.AioRpcError) as info:
                    await admin.GetPolicy(admin_pb2.GetPolicyRequest(), metadata=metadata)
                assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
                assert "bearer token" in info.value.details()
            with pytest.raises(grpc.aio.AioRpcError) as info:  # streaming-free call, but a write
                await admin.SetPolicy(
                    admin_pb2.SetPolicyRequest(policy=admin_pb2.PolicySpec(name="least-loaded"))
                )
            assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
            assert fleet.server.core.policy.name == "fcfs-full"  # the unauthenticated swap did nothing
            ok = await admin.GetPolicy(admin_pb2.GetPolicyRequest(), metadata=bearer_metadata("s3cret"))
            assert ok.policy.name == "fcfs-full"
            # the client API needs no token here (no --api-token) and works over TLS
            client = scheduler_pb2_grpc.SchedulerServiceStub(channel)
            tokens, _ = await collect(client.Generate(generate_request([1, 2], 4)))
            assert tokens == expected_tokens([1, 2], 4)
        async with grpc.aio.insecure_channel(fleet.address) as plain:
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await scheduler_pb2_grpc.SchedulerServiceStub(plain).GetRequest(
                    scheduler_pb2.GetRequestRequest(request_id="x"), timeout=5
                )
            assert info.value.code() == grpc.StatusCode.UNAVAILABLE
    finally:
        await fleet.close()


async def test_api_token_guards_the_client_api_when_set(redis_url: str) -> None:
    fleet = await start_fleet(redis_url, [StubWorker("w0")], api_token="client-tok")
    try:
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await collect(fleet.client.Generate(generate_request([1], 2)))
        assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
        tokens, _ = await collect(
            fleet.client.Generate(generate_request([1], 2), metadata=bearer_metadata("client-tok"))
        )
        assert tokens == expected_tokens([1], 2)
    finally:
        await fleet.close()


async def test_scheduler_dials_workers_with_mutual_tls(redis_url: str, pki: Pki) -> None:
    worker = StubWorker("w0", tls=TLSFiles(pki.server_cert, pki.server_key, pki.ca))
    fleet = await start_fleet(
        redis_url,
        [worker],
        tls_cert=pki.client_cert,
        tls_key=pki.client_key,
        tls_ca=pki.ca,
        worker_server_name="localhost",
    )
    try:
        async with open_channel(fleet.address, ca=pki.ca, server_name="scheduler") as channel:
            tokens, _ = await collect(
                scheduler_pb2_grpc.SchedulerServiceStub(channel).Generate(generate_request([4, 4], 5))
            )
        assert tokens == expected_tokens([4, 4], 5)
        assert worker.dispatched  # the dispatch went over mutual TLS
    finally:
        await fleet.close()


async def test_worker_with_mutual_tls_rejects_plaintext_and_wrong_certificates(pki: Pki) -> None:
    worker = StubWorker("w0", tls=TLSFiles(pki.server_cert, pki.server_key, pki.ca))
    await worker.start()
    try:
        attempts = [
            grpc.aio.insecure_channel(worker.address),
            open_channel(worker.address, ca=pki.ca, server_name="localhost"),  # no client certificate
            open_channel(
                worker.address, ca=pki.ca, cert=pki.rogue_cert, key=pki.rogue_key, server_name="localhost"
            ),
        ]
        for channel in attempts:
            async with channel:
                with pytest.raises(grpc.aio.AioRpcError) as info:
                    await worker_pb2_grpc.WorkerServiceStub(channel).Describe(
                        worker_pb2.DescribeRequest(), timeout=5
                    )
                assert info.value.code() == grpc.StatusCode.UNAVAILABLE
        good = open_channel(
            worker.address, ca=pki.ca, cert=pki.client_cert, key=pki.client_key, server_name="localhost"
        )
        async with good:
            described = await worker_pb2_grpc.WorkerServiceStub(good).Describe(
                worker_pb2.DescribeRequest(), timeout=5
            )
        assert described.worker_id == "w0"
    finally:
        await worker.stop()


def test_start_up_warns_when_protection_is_off(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="common.security"):
        warn_if_insecure("scheduler", TLSFiles(), {"layerkv.v1.AdminService": ""}, mutual_expected=True)
    text = caplog.text
    assert "PLAINTEXT" in text and "WITHOUT a bearer token" in text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="common.security"):
        warn_if_insecure("worker", TLSFiles("c.pem", "k.pem"), {"x": "tok"}, mutual_expected=True)
    assert "no --tls-ca" in caplog.text and "PLAINTEXT" not in caplog.text


def test_tls_files_are_checked_early(tmp_path: Path) -> None:
    with pytest.raises(errors.InvalidArgument, match="both a certificate and a key"):
        TLSFiles(cert="a.pem").check()
    with pytest.raises(errors.InvalidArgument, match="does not exist"):
        TLSFiles(cert=str(tmp_path / "nope.pem"), key=str(tmp_path / "nope.key")).check()


def test_every_error_class_has_one_status() -> None:
    classes = [c for c in vars(errors).values() if isinstance(c, type) and issubclass(c, errors.LayerKVError)]
    for cls in classes:
        code = status_of(cls("m"))
        assert code is not grpc.StatusCode.INTERNAL, cls
        back = error_from_status(code, "m")
        assert isinstance(cls("m"), type(back)) or cls is errors.LayerKVError, (cls, type(back))
    assert status_of(errors.Unsupported("x")) == grpc.StatusCode.INVALID_ARGUMENT  # the subclass rule
    assert status_of(KeyError("x")) == grpc.StatusCode.INTERNAL
    assert len(set(STATUS_OF.values())) == len(STATUS_OF)


class _Failing(admin_pb2_grpc.AdminServiceServicer):
    async def GetPolicy(self, request, context):
        raise errors.FailedPrecondition("worker w1 is draining")

    async def ListWorkers(self, request, context):
        raise KeyError("secret internals")


async def test_the_edge_maps_errors_and_hides_unexpected_ones(caplog: pytest.LogCaptureFixture) -> None:
    server = grpc.aio.server(interceptors=[ErrorInterceptor()])
    admin_pb2_grpc.add_AdminServiceServicer_to_server(_Failing(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = admin_pb2_grpc.AdminServiceStub(channel)
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await stub.GetPolicy(admin_pb2.GetPolicyRequest())
            assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION
            assert info.value.details() == "worker w1 is draining"
            with (
                caplog.at_level(logging.ERROR, logger="common.grpc_errors"),
                pytest.raises(grpc.aio.AioRpcError) as info,
            ):
                await stub.ListWorkers(admin_pb2.ListWorkersRequest())
            assert info.value.code() == grpc.StatusCode.INTERNAL
            assert "secret internals" not in info.value.details() and "KeyError" in info.value.details()
            assert "secret internals" in caplog.text  # logged with the traceback for the operator
    finally:
        await server.stop(None)
