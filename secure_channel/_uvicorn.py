"""Serving with uvicorn: TLS context, peer certificate in the ASGI scope, sealed channel."""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import ssl
import weakref
from typing import Any

import uvicorn
from cryptography import x509
from uvicorn.protocols.http.h11_impl import H11Protocol
from uvicorn.protocols.websockets.websockets_sansio_impl import WebSocketsSansIOProtocol

from secure_channel._base import check_security_mode
from secure_channel._exceptions import CredentialsError
from secure_channel._keys import Credentials, cert_identity
from secure_channel._middleware import AESGCMMiddleware, ASGIApp, Receive, Scope, Send
from secure_channel._tls import _has_client_auth_eku, server_ssl_context
from secure_channel._trust import ServerTrust

logger = logging.getLogger("secure_channel")
#: Largest WebSocket message the server reads (checked from the frame header, before buffering).
DEFAULT_WS_MAX_SIZE = 64 * 1024 * 1024 + 128 * 1024


class _WithTLSExtension:
    """Adds the connection's ASGI TLS extension (plus our identity key) to every scope."""

    def __init__(self, app: ASGIApp, tls: dict[str, Any]) -> None:
        self.app = app
        self.tls = tls

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] in ("http", "websocket"):
            scope = {**scope, "extensions": {**(scope.get("extensions") or {}), "tls": self.tls}}
        await self.app(scope, receive, send)


def _admit(protocol: Any, transport: asyncio.Transport) -> bool:
    """After the TLS handshake: drop a client whose certificate lacks ``clientAuth`` or is revoked,
    abort the connection when the certificate expires, and put the verified certificate into
    every scope of ``protocol`` (``protocol.app`` is wrapped). False if the client was dropped."""
    ssl_object = transport.get_extra_info("ssl_object")
    if ssl_object is None:
        return True
    der = ssl_object.getpeercert(binary_form=True)
    if der is None or not _has_client_auth_eku(der):
        logger.warning("dropping TLS connection: client certificate missing or not for clientAuth")
        transport.abort()
        return False
    cert = x509.load_der_x509_certificate(der)
    if protocol.trust is not None and not protocol.trust.check(cert):
        logger.warning("dropping TLS connection: client certificate revoked")
        transport.abort()
        return False
    protocol.peer = cert_identity(cert)
    if protocol.live is not None:
        protocol.live.add(protocol)
    # A kept-alive connection must not outlive the certificate it was opened with.
    remaining = (cert.not_valid_after_utc - dt.datetime.now(dt.UTC)).total_seconds()
    protocol._expiry = asyncio.get_running_loop().call_later(max(0.0, remaining), transport.abort)
    tls = {
        "server_cert": None,
        "client_cert_chain": [ssl.DER_cert_to_PEM_cert(der)],
        "client_cert_name": cert.subject.rfc4514_string(),
        "client_cert_error": None,
        "tls_version": 0x0304,
        "cipher_suite": None,
        "lambda_split.peer_identity": protocol.peer,
    }
    protocol.app = _WithTLSExtension(protocol.app, tls)
    return True


class PeerCertH11Protocol(H11Protocol):
    """uvicorn's h11 protocol, plus: after the TLS handshake, drop clients whose certificate
    lacks ``clientAuth`` or is revoked, close the connection when the certificate expires, and
    expose the verified certificate as ``scope["extensions"]["tls"]``."""

    trust: ServerTrust | None = None
    live: weakref.WeakSet[Any] | None = None
    _expiry: asyncio.TimerHandle | None = None
    peer: str | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        _admit(self, transport)

    def connection_lost(self, exc: Exception | None) -> None:
        if self._expiry is not None:
            self._expiry.cancel()
        super().connection_lost(exc)


class PeerCertWebSocketProtocol(WebSocketsSansIOProtocol):
    """uvicorn's sans-I/O WebSocket protocol (the connection after an upgrade), with the same
    certificate checks, expiry, revocation cut-off and ``tls`` scope extension as the h11 one."""

    trust: ServerTrust | None = None
    live: weakref.WeakSet[Any] | None = None
    _expiry: asyncio.TimerHandle | None = None
    peer: str | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        _admit(self, transport)  # type: ignore[arg-type]

    def connection_lost(self, exc: Exception | None) -> None:
        if self._expiry is not None:
            self._expiry.cancel()
        super().connection_lost(exc)


def _bind_protocols(
    trust: ServerTrust,
) -> tuple[type[PeerCertH11Protocol], type[PeerCertWebSocketProtocol]]:
    """Protocol subclasses (HTTP and WebSocket) that check ``trust`` and drop revoked peers on reload."""
    live: weakref.WeakSet[Any] = weakref.WeakSet()

    def close_revoked(identities: frozenset[str]) -> None:
        for protocol in list(live):
            if protocol.peer in identities:
                protocol.transport.abort()

    trust.subscribe(close_revoked)
    bound = {"trust": trust, "live": live}
    return (
        type("TrustedPeerCertH11Protocol", (PeerCertH11Protocol,), bound),
        type("TrustedPeerCertWebSocketProtocol", (PeerCertWebSocketProtocol,), bound),
    )


def _context_for(trust: ServerTrust) -> ssl.SSLContext:
    crl = trust.crl_path
    return server_ssl_context(trust.credentials, crl if crl.is_file() else None)


def _has_aesgcm_middleware(app: Any) -> bool:
    """True if ``app`` is an AESGCMMiddleware or a Starlette app that lists one explicitly."""
    if isinstance(app, AESGCMMiddleware):
        return True
    return any(getattr(m, "cls", None) is AESGCMMiddleware for m in getattr(app, "user_middleware", ()))


def uvicorn_config(
    app: ASGIApp,
    *,
    host: str,
    port: int,
    security: str,
    credentials: Credentials | ServerTrust | None = None,
    aesgcm_options: dict[str, Any] | None = None,
    **kwargs: Any,
) -> uvicorn.Config:
    """A loaded ``uvicorn.Config`` serving ``app`` in ``security`` mode.

    tls modes install :func:`server_ssl_context` (TLS 1.3, client certificate required);
    aesgcm modes wrap ``app`` in :class:`AESGCMMiddleware` (options from ``aesgcm_options``)
    unless ``app`` is one or is a Starlette app whose middleware list names it, so an aesgcm
    server can never answer unsealed requests. In every mode the HTTP protocol is :class:`PeerCertH11Protocol`
    and the WebSocket protocol :class:`PeerCertWebSocketProtocol`, so :func:`peer_identity` works on both;
    ``ws_max_size`` (default :data:`DEFAULT_WS_MAX_SIZE`) caps one stream message. ``kwargs`` go to ``uvicorn.Config``. Modes other than
    ``plain`` need server ``credentials`` (CredentialsError otherwise); pass a
    :class:`ServerTrust` to share it with the app and reload it (revocations) while serving.
    """
    mode = check_security_mode(security)
    trust: ServerTrust | None = None
    if mode != "plain":
        if credentials is None:
            raise CredentialsError(f"security mode {mode} needs server credentials (--keys DIR)")
        if isinstance(credentials, Credentials) and credentials.role != "server":
            raise CredentialsError("the server needs server credentials")
        trust = credentials if isinstance(credentials, ServerTrust) else ServerTrust(credentials)
    if kwargs.keys() & {"ssl_keyfile", "ssl_certfile", "ssl_context_factory", "http", "ws"}:
        raise ValueError("uvicorn_config owns the TLS and HTTP protocol settings")
    served: ASGIApp = app
    if mode in ("aesgcm", "tls+aesgcm") and trust is not None:
        if not _has_aesgcm_middleware(app):
            served = AESGCMMiddleware(app, trust, **(aesgcm_options or {}))
        elif aesgcm_options:
            logger.warning("aesgcm_options ignored: the app already lists AESGCMMiddleware")
    if mode in ("tls", "tls+aesgcm") and trust is not None:
        ctx = trust.use_ssl_context(_context_for)
        kwargs["ssl_context_factory"] = lambda _config, _default: ctx
    protocols = (PeerCertH11Protocol, PeerCertWebSocketProtocol) if trust is None else _bind_protocols(trust)
    # WebSocket streams: no compression (it would leak through sizes), no server pings (the
    # app's idle deadline closes dead streams), and messages capped from the frame header.
    kwargs.setdefault("ws_max_size", DEFAULT_WS_MAX_SIZE)
    kwargs.update(ws_per_message_deflate=False, ws_ping_interval=None, ws_ping_timeout=None)
    config = uvicorn.Config(served, host=host, port=port, http=protocols[0], ws=protocols[1], **kwargs)
    config.load()
    return config
