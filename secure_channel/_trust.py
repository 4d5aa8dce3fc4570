"""The server's live view of its keys directory: its credentials and the revocation list.

:class:`ServerTrust` is what the TLS context, the uvicorn protocol and the AES-GCM middleware
consult for every new peer. :meth:`ServerTrust.reload` (on SIGHUP, or when ``crl.pem``
changes) re-reads the server certificate and the CRL, points new TLS handshakes at a fresh
context, and tells subscribers which identities were revoked so they can close what those
peers still hold open. All of it runs on the server's event loop thread.
"""

from __future__ import annotations

import logging
import os
import ssl
import time
from collections.abc import Callable
from pathlib import Path

from cryptography import x509

from secure_channel._ca import CRL_FILE, read_crl
from secure_channel._exceptions import ChannelError
from secure_channel._keys import Credentials, cert_identity, load_credentials

logger = logging.getLogger("secure_channel")
Listener = Callable[[frozenset[str]], object]
CHECK_INTERVAL_S = 1.0


class ServerTrust:
    """Server credentials plus the CRL of their directory, reloadable without a restart."""

    def __init__(self, credentials: Credentials, *, clock: Callable[[], float] = time.monotonic) -> None:
        if credentials.role != "server":
            raise ValueError("ServerTrust needs server credentials")
        self.credentials = credentials
        self.revoked: frozenset[int] = read_crl(credentials.directory, credentials.ca_cert)
        self._clock = clock
        self._checked = clock()
        self._mtime = self._crl_mtime()
        self._seen: dict[int, str] = {}  # serial -> identity of peers that authenticated
        self._listeners: list[Listener] = []
        self.ssl_context: ssl.SSLContext | None = None
        self._context_factory: Callable[[ServerTrust], ssl.SSLContext] | None = None

    @classmethod
    def load(cls, directory: str | os.PathLike[str]) -> ServerTrust:
        return cls(load_credentials(directory, "server"))

    @property
    def crl_path(self) -> Path:
        return self.credentials.directory / CRL_FILE

    def _crl_mtime(self) -> int:
        try:
            return self.crl_path.stat().st_mtime_ns
        except OSError:
            return 0

    def subscribe(self, listener: Listener) -> None:
        """Call ``listener(revoked_identities)`` after every reload that revoked someone."""
        self._listeners.append(listener)

    def use_ssl_context(self, factory: Callable[[ServerTrust], ssl.SSLContext]) -> ssl.SSLContext:
        """Build the TLS context with ``factory`` now and again on every reload; return the first one.

        New handshakes switch to the current context from the SNI callback, which OpenSSL calls
        before it verifies the client, so they see the current certificate and CRL.
        """
        self._context_factory = factory
        self.ssl_context = factory(self)
        self.ssl_context.sni_callback = self._on_client_hello
        return self.ssl_context

    def _on_client_hello(self, ssl_object: ssl.SSLObject, _name: str | None, _ctx: ssl.SSLContext) -> None:
        try:
            self.maybe_reload()
            if self.ssl_context is not None and ssl_object.context is not self.ssl_context:
                ssl_object.context = self.ssl_context
        except Exception as exc:  # never let a reload failure break handshakes with the old trust
            logger.error("credentials reload failed: %s", exc)

    def check(self, cert: x509.Certificate) -> bool:
        """True if ``cert`` (already chain-verified) is not revoked; remembers who authenticated."""
        self.maybe_reload()
        if cert.serial_number in self.revoked:
            return False
        if len(self._seen) > 100_000:
            self._seen.clear()
        self._seen[cert.serial_number] = cert_identity(cert)
        return True

    def maybe_reload(self) -> None:
        """Reload if ``crl.pem`` changed; looks at the file at most once a second."""
        now = self._clock()
        if now - self._checked < CHECK_INTERVAL_S:
            return
        self._checked = now
        if self._crl_mtime() != self._mtime:
            try:
                self.reload()
            except ChannelError as exc:  # like nginx: a bad reload keeps the old state
                logger.error("credentials reload failed, keeping the old ones: %s", exc)

    def reload(self) -> frozenset[str]:
        """Re-read the server credentials and the CRL; return (and announce) newly revoked identities.

        Raises CredentialsError (and keeps the old state) if the new files do not load.
        """
        self._mtime = self._crl_mtime()
        credentials = load_credentials(self.credentials.directory, "server")
        revoked = read_crl(credentials.directory, credentials.ca_cert)
        self.credentials, newly, self.revoked = credentials, revoked - self.revoked, revoked
        if self._context_factory is not None:
            ctx = self._context_factory(self)
            ctx.sni_callback = self._on_client_hello
            self.ssl_context = ctx
        identities = frozenset(self._seen.pop(s) for s in newly if s in self._seen)
        logger.warning(
            "credentials reloaded: %d certificate(s) revoked, %d newly; closing %d live identities",
            len(revoked), len(newly), len(identities),
        )  # fmt: skip
        for listener in self._listeners:
            try:
                listener(identities)
            except Exception as exc:
                logger.error("revocation listener failed: %s", type(exc).__name__)
        return identities
