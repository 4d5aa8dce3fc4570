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

from secure_channel._base import check_security_mode
from secure_channel._exceptions import CredentialsError
from secure_channel._keys import Credentials, cert_identity
from secure_channel._middleware import AESGCMMiddleware, ASGIApp, Receive, Scope, Send
from secure_channel._tls import _has_client_auth_eku, server_ssl_context
from secure_channel._trust import ServerTrust

logger = logging.getLogger("secure_channel")


class _WithTLSExtension:
    """Adds the connection's ASGI TLS extension (plus our identity key) to every scope."""

    def __init__(self, app: ASGIApp, tls: dict[str, Any]) -> None:
        self.app = app
        self.tls = tls

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] in ("http", "websocket"):
            scope = {**scope, "extensions": {**(scope.get("extensions") or {}), "tls": self.tls}}
        await self.app(scope, receive, send)


class PeerCertH11Protocol(H11Protocol):
    """uvicorn's h11 protocol, plus: after the TLS handshake, drop clients whose certificate
    lacks ``clientAuth`` or is revoked, close the connection when the certificate expires, and
    expose the verified certificate as ``scope["extensions"]["tls"]``."""

    trust: ServerTrust | None = None
    live: weakref.WeakSet[PeerCertH11Protocol] | None = None
    _expiry: asyncio.TimerHandle | None = None
    peer: str | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        ssl_object = transport.get_extra_info("ssl_object")
        if ssl_object is None:
            return
        der = ssl_object.getpeercert(binary_form=True)
        if der is None or not _has_client_auth_eku(der):
            logger.warning("dropping TLS connection: client certificate missing or not for clientAuth")
            transport.abort()
            return
        cert = x509.load_der_x509_certificate(der)
        if self.trust is not None and not self.trust.check(cert):
            logger.warning("dropping TLS connection: client certificate revoked")
            transport.abort()
            return
        self.peer = cert_identity(cert)
        if self.live is not None:
            self.live.add(self)
        # A kept-alive connection must not outlive the certificate it was opened with.
        remaining = (cert.not_valid_after_utc - dt.datetime.now(dt.UTC)).total_seconds()
        self._expiry = asyncio.get_running_loop().call_later(max(0.0, remaining), transport.abort)
        subject = cert.subject.rfc4514_string()
        tls = {
            "server_cert": None,
            "client_cert_chain": [ssl.DER_cert_to_PEM_cert(der)],
            "client_cert_name": subject,
            "client_cert_error": None,
            "tls_version": 0x0304,
            "cipher_suite": None,
            "lambda_split.peer_identity": self.peer,
        }
        self.app = _WithTLSExtension(self.app, tls)

    def connection_lost(self, exc: Exception | None) -> None:
        if self._expiry is not None:
            self._expiry.cancel()
        super().connection_lost(exc)


def _bind_protocol(trust: ServerTrust) -> type[PeerCertH11Protocol]:
    """A PeerCertH11Protocol subclass that checks ``trust`` and drops revoked peers on reload."""
    live: weakref.WeakSet[PeerCertH11Protocol] = weakref.WeakSet()

    def close_revoked(identities: frozenset[str]) -> None:
        for protocol in list(live):
            if protocol.peer in identities:
                protocol.transport.abort()

    trust.subscribe(close_revoked)
    return type("TrustedPeerCertH11Protocol", (PeerCertH11Protocol,), {"trust": trust, "live": live})


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
    server can never answer unsealed requests. In every mode the HTTP protocol is :class:`PeerCertH11Protocol`,
    so :func:`peer_identity` works. ``kwargs`` go to ``uvicorn.Config``. Modes other than
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
    if kwargs.keys() & {"ssl_keyfile", "ssl_certfile", "ssl_context_factory", "http"}:
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
    protocol = PeerCertH11Protocol if trust is None else _bind_protocol(trust)
    config = uvicorn.Config(served, host=host, port=port, http=protocol, **kwargs)
    config.load()
    return config
