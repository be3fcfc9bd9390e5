"""Transport security and bearer tokens for every gRPC port of the fleet.

TLS credentials come from PEM files: a server certificate turns TLS on; with a CA the server also
requires client certificates signed by it (mutual TLS, used between the scheduler and its workers).
``TokenAuthInterceptor`` demands ``authorization: Bearer <token>`` on the services it guards.
``warn_if_insecure`` logs one clear warning at start-up for every protection that is off.
"""

from __future__ import annotations

import hmac
import logging
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import grpc
import grpc.aio

from common.errors import InvalidArgument

log = logging.getLogger(__name__)

AUTH_HEADER = "authorization"


@dataclass(frozen=True)
class TLSFiles:
    """PEM files of one endpoint; all empty means plaintext."""

    cert: str = ""  # certificate chain of this endpoint
    key: str = ""  # its private key
    ca: str = ""  # CA that signed the peers' certificates (mutual TLS when set on a server)

    @property
    def enabled(self) -> bool:
        return bool(self.cert)

    def check(self) -> None:
        """Fail early, naming the file, when a configured PEM file is missing or half-configured."""
        if bool(self.cert) != bool(self.key):
            raise InvalidArgument(
                f"TLS needs both a certificate and a key (got cert={self.cert!r}, key={self.key!r})"
            )
        for label, path in (("certificate", self.cert), ("key", self.key), ("CA", self.ca)):
            if path and not Path(path).is_file():
                raise InvalidArgument(f"TLS {label} file {path!r} does not exist")


def _read(path: str) -> bytes:
    return Path(path).read_bytes()


def server_credentials(tls: TLSFiles) -> grpc.ServerCredentials:
    """Server TLS; with ``tls.ca`` clients must present a certificate signed by that CA."""
    tls.check()
    if not tls.enabled:
        raise InvalidArgument("server_credentials needs a certificate and key")
    ca = _read(tls.ca) if tls.ca else None
    return grpc.ssl_server_credentials(
        [(_read(tls.key), _read(tls.cert))], root_certificates=ca, require_client_auth=ca is not None
    )


def channel_credentials(ca: str = "", cert: str = "", key: str = "") -> grpc.ChannelCredentials:
    """Client TLS trusting ``ca`` (system roots when empty); ``cert``/``key`` present a client cert."""
    TLSFiles(cert, key, ca).check()
    return grpc.ssl_channel_credentials(
        root_certificates=_read(ca) if ca else None,
        private_key=_read(key) if key else None,
        certificate_chain=_read(cert) if cert else None,
    )


def add_port(server: grpc.aio.Server, address: str, tls: TLSFiles) -> int:
    """Bind ``address`` with TLS when configured; return the bound port (0 → a free port)."""
    if tls.enabled:
        return server.add_secure_port(address, server_credentials(tls))
    return server.add_insecure_port(address)


def open_channel(
    target: str,
    ca: str = "",
    cert: str = "",
    key: str = "",
    server_name: str = "",
    options: Iterable[tuple[str, object]] = (),
) -> grpc.aio.Channel:
    """An aio channel: TLS when ``ca`` is given (mutual with ``cert``/``key``), plaintext otherwise.

    ``server_name`` overrides the name checked against the server certificate (useful when the
    address is an IP or a pod name not in the certificate).
    """
    opts = list(options)
    if server_name:
        opts.append(("grpc.ssl_target_name_override", server_name))
    if ca or cert:
        return grpc.aio.secure_channel(target, channel_credentials(ca, cert, key), options=opts)
    return grpc.aio.insecure_channel(target, options=opts)


def bearer_metadata(token: str) -> tuple[tuple[str, str], ...]:
    """Call metadata carrying ``token`` (empty when there is none); works on plaintext channels too."""
    return ((AUTH_HEADER, f"Bearer {token}"),) if token else ()


def service_of(method: str) -> str:
    """``/layerkv.v1.AdminService/SetPolicy`` → ``layerkv.v1.AdminService``."""
    return method.lstrip("/").split("/", 1)[0]


class TokenAuthInterceptor(grpc.aio.ServerInterceptor):
    """Requires ``authorization: Bearer <token>`` on the calls of the given services.

    ``tokens`` maps a full service name to its token; services not in the map are open.
    """

    def __init__(self, tokens: dict[str, str]) -> None:
        self._tokens = {service: token for service, token in tokens.items() if token}

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        expected = self._tokens.get(service_of(handler_call_details.method))
        if expected is None:
            return await continuation(handler_call_details)
        supplied = ""
        for item in handler_call_details.invocation_metadata or ():
            if item[0].lower() == AUTH_HEADER:
                value = item[1] if isinstance(item[1], str) else item[1].decode()
                supplied = value[len("Bearer ") :] if value.startswith("Bearer ") else ""
        if supplied and hmac.compare_digest(supplied.encode(), expected.encode()):
            return await continuation(handler_call_details)
        handler = await continuation(handler_call_details)
        return _deny(handler, handler_call_details.method, "missing" if not supplied else "wrong")


def _deny(handler: grpc.RpcMethodHandler | None, method: str, what: str) -> grpc.RpcMethodHandler:
    message = f"{what} bearer token for {service_of(method)}"

    async def deny_unary(request: object, context: grpc.aio.ServicerContext) -> None:
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, message)

    async def deny_stream(request: object, context: grpc.aio.ServicerContext) -> None:
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, message)

    deserializer = handler.request_deserializer if handler is not None else None
    serializer = handler.response_serializer if handler is not None else None
    if handler is not None and handler.unary_stream is not None:
        return grpc.unary_stream_rpc_method_handler(
            deny_stream, request_deserializer=deserializer, response_serializer=serializer
        )
    return grpc.unary_unary_rpc_method_handler(
        deny_unary, request_deserializer=deserializer, response_serializer=serializer
    )


def peer_common_name(context: grpc.aio.ServicerContext) -> str:
    """Common name of the client certificate of this call ("" without mutual TLS)."""
    names = list(context.auth_context().get("x509_common_name") or [])
    return names[0].decode() if names else ""


def warn_if_insecure(component: str, tls: TLSFiles, tokens: dict[str, str], mutual_expected: bool) -> None:
    """One clear warning per protection that is off (logged once at start-up)."""
    if not tls.enabled:
        log.warning(
            "SECURITY: %s serves gRPC in PLAINTEXT (no --tls-cert/--tls-key); anyone on the network "
            "can read and send its traffic",
            component,
        )
    elif mutual_expected and not tls.ca:
        log.warning("SECURITY: %s has no --tls-ca: peers are not authenticated (no mutual TLS)", component)
    for service, token in tokens.items():
        if not token:
            log.warning("SECURITY: %s serves %s WITHOUT a bearer token", component, service)
