"""Errors raised by secure_channel.

The tree, written out once::

    ChannelError                 base of everything this package raises
    ├── CredentialsError         key/certificate files missing, expired, wrong CA or wrong EKU (fails closed)
    │   └── KeysUsageError       a keys request that cannot be done as asked (also a ValueError)
    ├── TransportError           the peer could not be reached or the exchange broke off
    │   ├── ChannelTimeout       connect, read or write deadline passed
    │   ├── SessionLost          the server forgot the sealed session; a non-idempotent request was not re-sent
    │   ├── StreamClosed         the server closed a stream (close code and reason attached)
    │   └── StreamUnsupported    this transport cannot open a persistent stream
    └── AuthenticationError      the peer could not be authenticated, or a record did not verify
        └── InvalidRecord        an AES-GCM record failed to open; deliberately says nothing more

Library errors (ssl, httpcore, cryptography) are translated at the boundary with
``raise OurError(...) from exc``; no other exception type leaves a transport.
"""

from __future__ import annotations


class ChannelError(Exception):
    """Base class of every error raised by secure_channel."""


class CredentialsError(ChannelError):
    """Key or certificate material is missing, malformed, expired, or not fit for its role."""


class KeysUsageError(CredentialsError, ValueError):
    """A request to the certificate authority that cannot be done as asked: an existing file without
    ``force``, no certificate of that name, a malformed name, a validity out of range."""


class TransportError(ChannelError):
    """The exchange with the peer failed below the application (connection refused, reset, ...)."""


class ChannelTimeout(TransportError):
    """A connect, read or write deadline passed."""


class SessionLost(TransportError):
    """The server answered ``unknown_session`` (unauthenticated) to a request that is not safe to
    send twice, so it was not re-sent: it may or may not have run. The next exchange handshakes."""


class StreamClosed(TransportError):
    """The server closed the stream. ``code`` and ``reason`` are the WebSocket close code and
    reason; in the AES-GCM modes they are not authenticated (like an HTTP error reply)."""

    def __init__(self, code: int, reason: str) -> None:
        super().__init__(f"stream closed by the server ({code}: {reason or 'no reason'})")
        self.code = code
        self.reason = reason


class ServerBusy(TransportError):
    """The server refused for now (``503 overloaded`` or ``429 rate_limited``, both unauthenticated)
    and kept refusing through the client's bounded retries. ``retry_after`` is its last
    ``Retry-After`` in seconds, if it sent one: try again later, or at another replica."""

    def __init__(self, message: str, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class StreamUnsupported(TransportError):
    """This transport cannot open a persistent stream; use the request/response path instead."""


class AuthenticationError(ChannelError):
    """The peer could not be authenticated (TLS verification, handshake signature, ...)."""


class InvalidRecord(AuthenticationError):
    """An AES-GCM record did not verify. Opaque on purpose, like Fernet's InvalidToken."""
