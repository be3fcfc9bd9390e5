"""Transport security and bearer tokens for every gRPC port of the fleet.

TLS credentials come from PEM files: a server certificate turns TLS on; with a CA the server also
requires client certificates signed by it (mutual TLS, used between the scheduler and its workers).
``AccessGuard`` is the check a server's ``ErrorInterceptor`` runs on every call before decoding it:
per service, a bearer token (``authorization: Bearer <token>``) and/or the common name the client
certificate must carry. Channels opened with ``token`` send it on every call. ``warn_if_insecure``
logs one clear warning at start-up for every protection that is off.
"""

from __future__ import annotations

import hmac
import logging
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import grpc.aio

from common.errors import InvalidArgument, PermissionDenied, Unauthenticated

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
    token: str = "",
) -> grpc.aio.Channel:
    """An aio channel: TLS when ``ca`` is given (mutual with ``cert``/``key``), plaintext otherwise.

    ``server_name`` overrides the name checked against the server certificate (useful when the
    address is an IP or a pod name not in the certificate). ``token`` is sent as a bearer token on
    every call of the channel.
    """
    opts = list(options)
    if server_name:
        opts.append(("grpc.ssl_target_name_override", server_name))
    interceptors = _token_interceptors(token) if token else None
    if ca or cert:
        return grpc.aio.secure_channel(
            target, channel_credentials(ca, cert, key), options=opts, interceptors=interceptors
        )
    return grpc.aio.insecure_channel(target, options=opts, interceptors=interceptors)


def bearer_metadata(token: str) -> tuple[tuple[str, str], ...]:
    """Call metadata carrying ``token`` (empty when there is none); works on plaintext channels too."""
    return ((AUTH_HEADER, f"Bearer {token}"),) if token else ()


def service_of(method: str) -> str:
    """``/layerkv.v1.AdminService/SetPolicy`` → ``layerkv.v1.AdminService``."""
    return method.lstrip("/").split("/", 1)[0]


def _with_token(details: grpc.aio.ClientCallDetails, token: str) -> grpc.aio.ClientCallDetails:
    metadata = [m for m in (details.metadata or ()) if m[0] != AUTH_HEADER]
    metadata.extend(bearer_metadata(token))
    return grpc.aio.ClientCallDetails(
        details.method, details.timeout, grpc.aio.Metadata(*metadata), details.credentials,
        details.wait_for_ready,
    )


class _TokenUnary(grpc.aio.UnaryUnaryClientInterceptor):
    def __init__(self, token: str) -> None:
        self._token = token

    async def intercept_unary_unary(self, continuation: Any, details: Any, request: Any) -> Any:
        return await continuation(_with_token(details, self._token), request)


class _TokenStream(grpc.aio.UnaryStreamClientInterceptor):
    def __init__(self, token: str) -> None:
        self._token = token

    async def intercept_unary_stream(self, continuation: Any, details: Any, request: Any) -> Any:
        return await continuation(_with_token(details, self._token), request)


def _token_interceptors(token: str) -> list[Any]:
    return [_TokenUnary(token), _TokenStream(token)]


@dataclass(frozen=True)
class AccessRule:
    """Who may call one service: a bearer token and/or a client-certificate name ("" = not required)."""

    token: str = ""
    peer_name: str = ""


class AccessGuard:
    """The per-service access check (an ``Authorizer`` for ``common.grpc_errors.ErrorInterceptor``).

    Services without a rule, or whose rule requires nothing, are open (health, reflection).
    """

    def __init__(self, rules: dict[str, AccessRule]) -> None:
        self._rules = {name: rule for name, rule in rules.items() if rule.token or rule.peer_name}

    def __call__(self, method: str, context: grpc.aio.ServicerContext) -> None:
        service = service_of(method)
        rule = self._rules.get(service)
        if rule is None:
            return
        if rule.token:
            supplied = supplied_token(context.invocation_metadata() or ())
            if not supplied or not hmac.compare_digest(supplied.encode(), rule.token.encode()):
                raise Unauthenticated(f"{'wrong' if supplied else 'missing'} bearer token for {service}")
        if rule.peer_name:
            name = peer_common_name(context)
            if name != rule.peer_name:
                raise PermissionDenied(
                    f"only {rule.peer_name!r} may call {service} (peer certificate name {name[:64]!r})"
                )


def supplied_token(metadata: Iterable[Any]) -> str:
    """The bearer token in call metadata ("" when there is none or it is not a bearer token)."""
    for item in metadata:
        if item[0].lower() == AUTH_HEADER:
            value = item[1] if isinstance(item[1], str) else item[1].decode(errors="replace")
            return value[len("Bearer ") :] if value.startswith("Bearer ") else ""
    return ""


def peer_common_name(context: grpc.aio.ServicerContext) -> str:
    """Common name of the client certificate of this call ("" without mutual TLS)."""
    names = list(context.auth_context().get("x509_common_name") or [])
    return names[0].decode(errors="replace") if names else ""


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
