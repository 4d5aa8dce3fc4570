"""Run the trunk server under uvicorn in the configured security mode."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import math
import signal
import socket
import threading
from collections.abc import Callable, Iterator
from types import FrameType
from typing import Any

import uvicorn

from lambda_split import ServiceLimits, SplitSpec, TrunkService, load_llm_service, resolve
from lambda_split._background import ServerThread
from secure_channel import ChannelError, CredentialsError, ServerTrust, load_credentials, uvicorn_config
from server.app import build_app
from server.config import ENV_PREFIX, ConfigError, ServerConfig
from server.drain import Drain
from server.observability import LOGGER, configure_logging

DIFFUSION_MODELS = ("tiny-random-sd", "tiny-random-sdxl")


class PortUnavailable(OSError):
    """The configured address cannot be bound (in use, or not ours); found before the model loads."""


def bind_listener(host: str, port: int) -> socket.socket:
    """Bind ``host:port`` now, so a port in use fails before the model loads; uvicorn serves on
    this very socket, so nothing can take the port in between."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
        sock = socket.socket(family, kind, proto)
    except OSError as exc:
        raise PortUnavailable(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
    except OSError as exc:
        sock.close()
        reason = "the port is already in use" if exc.errno == errno.EADDRINUSE else exc.strerror or str(exc)
        raise PortUnavailable(
            f"cannot listen on {host}:{port}: {reason}; choose another with --port "
            f"(or port in the config file, or {ENV_PREFIX}PORT)"
        ) from None
    return sock


class ReadyServer(uvicorn.Server):
    """A uvicorn server on an already bound socket that reports its URL once it accepts connections
    and, on SIGHUP, reloads its certificate and revocation list (``trust``) without a restart.

    With a ``drain``, the first SIGTERM drains (:mod:`server.drain`) and then shuts down; SIGINT,
    or any signal during a drain, shuts down at once.
    """

    def __init__(
        self,
        config: uvicorn.Config,
        scheme: str,
        on_ready: Callable[[str], None],
        listener: socket.socket,
        trust: ServerTrust | None = None,
        drain: Drain | None = None,
    ) -> None:
        super().__init__(config)
        self.scheme = scheme
        self.on_ready = on_ready
        self.listener = listener
        self.url = ""
        self.trust = trust
        self.drain = drain
        self._loop: asyncio.AbstractEventLoop | None = None
        self._drain_task: asyncio.Future[None] | None = None

    def reload(self) -> None:
        """Re-read the server certificate and crl.pem; on failure keep serving with the old ones."""
        if self.trust is None:
            return
        try:
            self.trust.reload()
        except ChannelError as exc:
            LOGGER.error("reload failed, keeping the old credentials", extra={"fields": {"error": str(exc)}})

    def request_reload(self) -> None:
        """Reload on the server's event loop, from any thread (SIGHUP does this)."""
        if self._loop is not None:
            self._loop.call_soon_threadsafe(self.reload)

    def _on_sighup(self, _sig: int, _frame: object) -> None:
        self.request_reload()

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        """Signal handler (and, from any thread, the way tests send one)."""
        drain, loop = self.drain, self._loop
        first = drain is not None and not drain.draining and not self.should_exit
        if sig == signal.SIGTERM and first and drain is not None and loop is not None:
            drain.begin()
            loop.call_soon_threadsafe(self._start_drain)
            return
        if drain is not None and drain.draining:
            self.force_exit = True  # a second signal: no more waiting
        super().handle_exit(sig, frame)

    def _start_drain(self) -> None:
        self._drain_task = asyncio.ensure_future(self._drain_then_exit())

    async def _drain_then_exit(self) -> None:
        if self.drain is None:  # pragma: no cover - only scheduled with a drain
            return
        open_sessions = self.drain.service.open_sessions
        LOGGER.info(
            "draining", extra={"fields": {"open_sessions": open_sessions, "timeout_s": self.drain.timeout_s}}
        )
        drained = await self.drain.wait()
        fields = {"open_sessions": self.drain.service.open_sessions}
        (LOGGER.info if drained else LOGGER.warning)(
            "drained" if drained else "drain deadline passed", extra={"fields": fields}
        )
        self.should_exit = True

    def run(self, sockets: list[socket.socket] | None = None) -> None:
        try:
            super().run(sockets=sockets or [self.listener])
        finally:
            self.listener.close()

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        self._loop = asyncio.get_running_loop()
        await super().startup(sockets)
        if self.started and self.servers and self.servers[0].sockets:
            host, port = self.servers[0].sockets[0].getsockname()[:2]
            host = f"[{host}]" if ":" in host else host
            self.url = f"{self.scheme}://{host}:{port}"
            self.on_ready(self.url)

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        # uvicorn re-raises SIGTERM/SIGINT after its graceful shutdown, so the process would die by
        # the signal; the contract is a graceful shutdown with exit code 0.
        hangup = threading.current_thread() is threading.main_thread() and hasattr(signal, "SIGHUP")
        previous = signal.signal(signal.SIGHUP, self._on_sighup) if hangup else None
        try:
            with super().capture_signals():
                yield
                self._captured_signals.clear()
        finally:
            if hangup:
                signal.signal(signal.SIGHUP, previous)


def load_service(
    config: ServerConfig, progress: Callable[[str], None]
) -> tuple[TrunkService, dict[str, Any]]:
    limits: ServiceLimits = config.service_limits()
    if _is_diffusion(config.model):
        from lambda_split.diffusion import DiffusionLimits, load_diffusion_service

        if config.head_depths:
            raise ConfigError("head_depths is for language models; a diffusion trunk has no head depth")

        return load_diffusion_service(
            config.model,
            security=config.security,
            limits=limits,
            diffusion_limits=DiffusionLimits(max_steps_per_session=config.max_diffusion_steps),
            progress=progress,
        )
    checkpoint = resolve(config.model)  # reads the configuration, not the weights
    layers = int(checkpoint.config.num_hidden_layers)
    try:
        SplitSpec.parse(config.split, layers)
    except ValueError as exc:
        raise ConfigError(f"{exc} ({checkpoint.name})") from None
    depths = config.split_depths(layers)
    return load_llm_service(
        checkpoint,
        config.split,
        security=config.security,
        limits=limits,
        scheduling=config.scheduler_config(),
        progress=progress,
        head_depths=None if depths is None else str(depths),
    )


def _is_diffusion(model: str) -> bool:
    from pathlib import Path

    return model in DIFFUSION_MODELS or (Path(model) / "model_index.json").is_file()


def attach_receipts(
    service: TrunkService, info: dict[str, Any], trust: ServerTrust | None, config: ServerConfig
) -> None:
    """Let sessions ask for signed step receipts (lambda_split._receipts), signed with the server key:
    the current one of ``trust``, or in plain mode the one in ``--keys`` if given and valid (else none:
    a session that asks for receipts is refused with 400 ``receipts_unavailable``)."""
    from lambda_split._receipts import ReceiptSigner

    if "fingerprint" not in info or "split" not in info:
        return
    if trust is not None:
        service.receipts = ReceiptSigner(lambda: trust.credentials, info)
    elif config.keys:
        try:
            credentials = load_credentials(config.keys, "server")
        except CredentialsError as exc:  # plain mode never needed keys: serve on, without receipts
            LOGGER.warning("no step receipts", extra={"fields": {"reason": str(exc)}})
            return
        service.receipts = ReceiptSigner(lambda: credentials, info)


def build_server(
    config: ServerConfig,
    *,
    on_ready: Callable[[str], None],
    progress: Callable[[str], None] = lambda _m: None,
    service: tuple[TrunkService, dict[str, Any]] | None = None,
) -> ReadyServer:
    """Validate ``config`` (fails closed), bind the port, load credentials and then the trunk,
    and return a ready-to-run server. Every check that can fail runs before the model loads."""
    config.validate()
    if not (math.isfinite(config.drain_timeout_s) and config.drain_timeout_s >= 0):
        raise ConfigError("drain_timeout_s must be a finite number of seconds, 0 or more")
    listener = bind_listener(config.host, config.port)
    try:
        trust: ServerTrust | None = None
        if config.security != "plain":
            trust = ServerTrust(load_credentials(config.keys or "", "server"))
        trunk_service, info = service or load_service(config, progress)
        attach_receipts(trunk_service, info, trust, config)
        if trust is not None:
            trust.subscribe(trunk_service.close_owners)  # a revoked device loses its trunk sessions
        drain = Drain(trunk_service, config.drain_timeout_s)
        app = build_app(trunk_service, info, config, trust, drain=drain)
        proxies = [p.strip() for p in config.trusted_proxies.split(",") if p.strip()]
        uv_config = uvicorn_config(
            app,
            host=config.host,
            port=config.port,
            security=config.security,
            credentials=trust,
            # X-Forwarded-For is believed only from configured proxies (uvicorn trusts loopback by default)
            proxy_headers=bool(proxies),
            forwarded_allow_ips=proxies or [],
            server_header=False,
            access_log=False,
            log_level="warning",
            timeout_graceful_shutdown=10,
            h11_max_incomplete_event_size=16 * 1024,
            ws_max_size=config.max_body_bytes + 128 * 1024,  # one stream message, refused from its header
        )
        scheme = "https" if config.security in ("tls", "tls+aesgcm") else "http"
    except BaseException:
        listener.close()
        raise
    return ReadyServer(uv_config, scheme, on_ready, listener, trust, drain)


def serve(
    config: ServerConfig,
    *,
    on_ready: Callable[[str], None],
    progress: Callable[[str], None] = lambda _m: None,
) -> int:
    """Serve until SIGTERM (after a drain) or SIGINT, then shut down gracefully and return 0."""
    configure_logging()
    server = build_server(config, on_ready=on_ready, progress=progress)
    server.run()
    return 0 if server.started else 1


class BackgroundServer(ServerThread[ReadyServer]):
    """A trunk server on its own thread, for the demo, the benchmarks, the eavesdrop suite and tests.

    ``service`` is an already loaded ``(TrunkService, info)``, so several servers (one per
    security mode, say) can share one model in memory. Use as a context manager, or call
    :meth:`stop`.
    """

    def __init__(self, config: ServerConfig, service: tuple[TrunkService, dict[str, Any]], *,
                 name: str = "trunk-server", timeout_s: float = 60.0) -> None:  # fmt: skip
        super().__init__(lambda on_ready: build_server(config, on_ready=on_ready, service=service), name=name,
                         what=f"the {config.security} trunk server", timeout_s=timeout_s)  # fmt: skip
