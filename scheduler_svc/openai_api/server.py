"""uvicorn serving the API on the scheduler's own event loop, next to the grpc.aio server.

``HttpServer`` binds when built (port 0 picks a free one); ``start`` runs ``uvicorn.Server.serve``
as a task of the running loop; ``stop`` asks it to finish in-flight responses and waits. Signals stay
with the scheduler process (uvicorn must not install handlers of its own), and TLS follows the
scheduler's gRPC certificate.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket

import uvicorn

from common.config import SchedulerSettings
from common.errors import Unavailable
from scheduler_svc.core import SchedulerCore
from scheduler_svc.openai_api.app import build_app
from scheduler_svc.openai_api.gateway import CoreGateway, RequestGateway

log = logging.getLogger(__name__)


class _Server(uvicorn.Server):
    def install_signal_handlers(self) -> None:  # the scheduler owns SIGINT/SIGTERM
        return None


class HttpServer:
    """The OpenAI-compatible API on ``host:port``; ``port`` is the bound one."""

    def __init__(
        self, gateway: RequestGateway, host: str, port: int, api_token: str = "",
        tls_cert: str = "", tls_key: str = "",
    ) -> None:  # fmt: skip
        self._host = host
        self.port = port
        self.scheme = "https" if tls_cert else "http"
        config = uvicorn.Config(
            build_app(gateway, api_token), log_level="warning", access_log=False, lifespan="off",
            loop="none", ssl_certfile=tls_cert or None, ssl_keyfile=tls_key or None,
            timeout_graceful_shutdown=5,
        )  # fmt: skip
        self._server = _Server(config)
        self._task: asyncio.Task[None] | None = None
        self._socket: socket.socket | None = self._bind()

    def _bind(self) -> socket.socket:
        """Bind at construction, so a taken port fails before anything else of the scheduler starts."""
        family = socket.AF_INET6 if ":" in self._host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((self._host, self.port))
        except OSError as exc:
            sock.close()
            raise Unavailable(f"the HTTP API cannot listen on {self._host}:{self.port}: {exc}") from exc
        sock.set_inheritable(True)
        self.port = int(sock.getsockname()[1])
        return sock

    async def start(self) -> int:
        assert self._socket is not None, "an HttpServer starts once"
        sock = self._socket
        self._task = asyncio.create_task(self._server.serve(sockets=[sock]), name="openai-http")
        while not self._server.started:
            if self._task.done():  # failed to start: surface its exception
                self._task.result()
                raise RuntimeError("the HTTP server stopped before it started")
            await asyncio.sleep(0.01)
        log.info("OpenAI-compatible API on %s://%s:%d/v1", self.scheme, self._host, self.port)
        return self.port

    async def stop(self, grace: float | None = 5.0) -> None:
        """Stop accepting, give open responses ``grace`` seconds, then close them."""
        if self._task is not None:
            self._server.config.timeout_graceful_shutdown = int(grace or 0)
            self._server.should_exit = True
            with contextlib.suppress(asyncio.TimeoutError, asyncio.CancelledError):
                await asyncio.wait_for(asyncio.shield(self._task), timeout=(grace or 0) + 3)
            if not self._task.done():
                self._task.cancel()
        if self._socket is not None:
            self._socket.close()


def http_server(settings: SchedulerSettings, core: SchedulerCore) -> HttpServer | None:
    """The API server the settings ask for (``http_port`` None or negative: none)."""
    if settings.http_port is None or settings.http_port < 0:
        return None
    gateway = CoreGateway(core, settings.served_model_name)
    return HttpServer(gateway, settings.host, settings.http_port, settings.api_token,
                      settings.tls_cert, settings.tls_key)  # fmt: skip
