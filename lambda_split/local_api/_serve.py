"""Serving the local endpoint with uvicorn, in the foreground (the CLI) or on a thread (tests)."""

from __future__ import annotations

import contextlib
import errno
import ipaddress
import socket
from collections.abc import Callable, Iterator

import uvicorn
from starlette.types import ASGIApp

from lambda_split._background import ServerThread


class ListenError(OSError):
    """The address cannot be bound (in use, or not this machine's)."""


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def bind(host: str, port: int) -> socket.socket:
    """Bind now, so a port in use fails before the model loads; uvicorn serves on this socket."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
        sock = socket.socket(family, kind, proto)
    except OSError as exc:
        raise ListenError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
    except OSError as exc:
        sock.close()
        reason = "the port is already in use" if exc.errno == errno.EADDRINUSE else exc.strerror or str(exc)
        raise ListenError(f"cannot listen on {host}:{port}: {reason}; choose another with --port") from None
    return sock


class LocalServer(uvicorn.Server):
    """uvicorn on an already bound socket; calls ``on_ready(url)`` once it accepts connections."""

    def __init__(self, app: ASGIApp, listener: socket.socket, on_ready: Callable[[str], None]) -> None:
        super().__init__(
            uvicorn.Config(
                app,
                access_log=False,  # paths and statuses only, but nothing is logged per request at all
                log_level="warning",
                server_header=False,
                timeout_graceful_shutdown=5,
                lifespan="on",
            )
        )
        self.listener = listener
        self.on_ready = on_ready
        self.url = ""

    def run(self, sockets: list[socket.socket] | None = None) -> None:
        try:
            super().run(sockets=sockets or [self.listener])
        finally:
            self.listener.close()

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        # uvicorn re-raises SIGTERM/SIGINT after its graceful shutdown, so the process would die by
        # the signal; like ``serve``, a signal means a graceful shutdown and exit code 0.
        with super().capture_signals():
            yield
            self._captured_signals.clear()

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets)
        if self.started and self.servers and self.servers[0].sockets:
            host, port = self.servers[0].sockets[0].getsockname()[:2]
            host = f"[{host}]" if ":" in host else host
            self.url = f"http://{host}:{port}"
            self.on_ready(self.url)


class BackgroundLocal(ServerThread[LocalServer]):
    """The endpoint on a thread of this process, on a free loopback port (tests, benchmarks)."""

    def __init__(self, app: ASGIApp, *, host: str = "127.0.0.1", timeout_s: float = 30.0) -> None:
        super().__init__(lambda on_ready: LocalServer(app, bind(host, 0), on_ready), name="local-endpoint",
                         what="the local endpoint", timeout_s=timeout_s)  # fmt: skip
