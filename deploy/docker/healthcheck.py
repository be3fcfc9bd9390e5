"""Container health check: one call to the standard ``grpc.health.v1`` service of a LayerKV server.

Used by the images' HEALTHCHECK and, when TLS is on, by the Helm chart's exec probes (the kubelet's
native gRPC probe cannot speak TLS). It reads the same environment as the service it checks:
``LAYERKV_PORT`` and, when ``LAYERKV_TLS_CERT`` is set, ``LAYERKV_TLS_CA``/``LAYERKV_TLS_CERT``/
``LAYERKV_TLS_KEY`` (the pod's own certificate doubles as the client certificate that a worker with
mutual TLS demands). The name to verify the server certificate against is
``HEALTHCHECK_TLS_SERVER_NAME``, else the host part of ``LAYERKV_ADVERTISE_ADDRESS``. Exit status:
0 when the server answers SERVING, 1 otherwise.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc


def _read(path: str | None) -> bytes | None:
    return Path(path).read_bytes() if path else None


def check(
    port: int,
    *,
    host: str = "127.0.0.1",
    service: str = "",
    timeout_s: float = 3.0,
    env: dict[str, str] | None = None,
) -> bool:
    """True when the server on ``host:port`` reports SERVING for ``service`` ("" = the server)."""
    env = dict(os.environ) if env is None else env
    target = f"{host}:{port}"
    cert = env.get("LAYERKV_TLS_CERT")
    if cert:
        credentials = grpc.ssl_channel_credentials(
            root_certificates=_read(env.get("LAYERKV_TLS_CA")),
            private_key=_read(env.get("LAYERKV_TLS_KEY")),
            certificate_chain=_read(cert),
        )
        server_name = (
            env.get("HEALTHCHECK_TLS_SERVER_NAME")
            or env.get("LAYERKV_ADVERTISE_ADDRESS", "").rpartition(":")[0]
        )
        # We dial loopback, but the certificate names the pod's service address.
        options = [("grpc.ssl_target_name_override", server_name)] if server_name else []
        channel = grpc.secure_channel(target, credentials, options=options)
    else:
        channel = grpc.insecure_channel(target)
    with channel:
        try:
            reply = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=service), timeout=timeout_s
            )
        except grpc.RpcError as exc:
            print(f"health check of {target} failed: {exc.code().name}: {exc.details()}", file=sys.stderr)
            return False
    serving = reply.status == health_pb2.HealthCheckResponse.SERVING
    if not serving:
        status_name = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
        print(f"health check of {target}: {status_name}", file=sys.stderr)
    return serving


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, default=None, help="default: $LAYERKV_PORT")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--service", default="", help="health service name; '' is the whole server")
    parser.add_argument("--timeout", type=float, default=3.0, help="seconds")
    args = parser.parse_args(argv)
    port = args.port if args.port is not None else int(os.environ.get("LAYERKV_PORT", "50051"))
    return 0 if check(port, host=args.host, service=args.service, timeout_s=args.timeout) else 1


if __name__ == "__main__":
    sys.exit(main())
