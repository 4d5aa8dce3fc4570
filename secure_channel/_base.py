"""The transport seam between the split engine and the network."""

from __future__ import annotations

import json
import secrets
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, Literal, get_args

SecurityMode = Literal["plain", "tls", "aesgcm", "tls+aesgcm"]
SECURITY_MODES: tuple[SecurityMode, ...] = get_args(SecurityMode)


def check_security_mode(mode: str) -> SecurityMode:
    """Return ``mode`` if it names a security mode, else raise ValueError. There is no default."""
    if mode not in SECURITY_MODES:
        raise ValueError(f"unknown security mode {mode!r}; choose one of {', '.join(SECURITY_MODES)}")
    return mode


@dataclass(frozen=True)
class Request:
    """One HTTP-level request. ``path`` is origin-form (``/v1/info``); the transport owns the host.

    ``max_response_bytes`` caps the response body; socket transports stop reading and raise
    TransportError once it is passed (None: the transport's own default cap).
    """

    method: str
    path: str
    content: bytes = b""
    headers: Mapping[str, str] = field(default_factory=dict)
    max_response_bytes: int | None = None


@dataclass(frozen=True)
class Response:
    """One HTTP-level response, fully read."""

    status: int
    content: bytes = b""
    headers: Mapping[str, str] = field(default_factory=dict)

    def json(self) -> Any:
        return json.loads(self.content)


@dataclass
class WireStats:
    """Bytes written to and read from the socket, TLS and HTTP framing included."""

    bytes_sent: int = 0
    bytes_received: int = 0


class Stream:
    """A persistent, ordered, message-oriented channel to the server, opened by
    :meth:`Transport.open_stream`: each :meth:`send` carries one whole binary message and each
    :meth:`recv` returns one. Its ``stats`` are the owning transport's socket counters.

    ``send`` and ``recv`` raise :class:`TransportError` when the stream breaks off,
    :class:`StreamClosed` (with the peer's close code and reason) when the server closes it,
    :class:`ChannelTimeout` when a deadline passes and :class:`InvalidRecord` when a sealed
    message does not authenticate. A stream is used by one thread at a time.
    """

    stats: WireStats

    def send(self, message: bytes) -> None:
        raise NotImplementedError

    def recv(self) -> bytes:
        raise NotImplementedError

    def close(self) -> None:
        """Close the stream politely. Idempotent."""


def new_route() -> str:
    """A fresh routing key: 32 random hex digits (128 bits from :mod:`secrets`)."""
    return secrets.token_hex(16)


class Transport:
    """Carries requests to the trunk server and returns its responses.

    Subclasses implement :meth:`exchange` and, if they hold resources, :meth:`close`.
    The split engine only ever calls these two methods, which is why it cannot tell
    one security mode from another.
    """

    #: The security mode this transport provides, as named on the command line.
    security: SecurityMode
    #: Socket byte counters; transports that do not touch a socket leave them at zero.
    stats: WireStats
    #: The routing key: random per transport, sent in the clear as ``x-lambda-route`` on every
    #: request and stream upgrade, so a reverse proxy hashing on it sends them all to one replica
    #: (in the ``aesgcm`` modes it is bound into the channel's handshake). "" for transports
    #: that do not reach a network.
    route: str = ""

    def reroute(self) -> str:
        """Pick a new routing key (after a failover: the next requests may land elsewhere) and
        return it. Sealed channels bound to the old key are dropped."""
        return self.route

    def exchange(self, request: Request) -> Response:
        """Send ``request`` and return the complete response.

        Raises :class:`TransportError` if the peer cannot be reached or the exchange
        breaks off, :class:`ChannelTimeout` when a deadline passes, and
        :class:`AuthenticationError` (or its subclass :class:`InvalidRecord`) when the
        peer or a record cannot be authenticated. A non-2xx status is *not* an error
        here; it is returned for the caller to interpret.
        """
        raise NotImplementedError

    def open_stream(self, path: str, headers: Mapping[str, str] | None = None) -> Stream:
        """Open a persistent :class:`Stream` to ``path`` in this transport's security mode.

        Transports that cannot stream raise :class:`StreamUnsupported`; nothing falls back
        to another mode. ``headers`` go on the upgrade request, in the clear for a proxy.
        """
        from secure_channel._exceptions import StreamUnsupported

        raise StreamUnsupported(f"{type(self).__name__} cannot open streams")

    def close(self) -> None:
        """Release sockets and keys. Idempotent."""

    def __enter__(self) -> Transport:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
