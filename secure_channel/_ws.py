"""A WebSocket stream over the counted socket of :mod:`secure_channel._net`.

The framing is the ``websockets`` sans-I/O client protocol; the bytes go through the same
:class:`CountingBackend` (and, in the TLS modes, the same in-memory TLS 1.3 client with the
same context) as the HTTP transports, so the byte counters see every WebSocket, TLS and
handshake byte. No compression extension is offered: compressing secrets next to
attacker-influenced data leaks them, and a decode frame of hidden states does not compress.
"""

from __future__ import annotations

import contextlib
import ssl
from collections.abc import Callable, Iterator, Mapping

import httpcore
from websockets.client import ClientProtocol
from websockets.exceptions import InvalidHandshake, InvalidStatus, ProtocolError
from websockets.frames import Frame, Opcode
from websockets.http11 import Response as WSResponse
from websockets.protocol import State
from websockets.uri import parse_uri

from secure_channel._base import Stream, WireStats
from secure_channel._exceptions import (
    AuthenticationError,
    ChannelError,
    ChannelTimeout,
    StreamClosed,
    TransportError,
)
from secure_channel._net import CountingBackend, _tls_failure

_READ_SIZE = 65536
#: Default cap on one message from the server, checked from the frame header before buffering.
DEFAULT_MAX_MESSAGE = 1 << 30


@contextlib.contextmanager
def _translated(timeout_message: str, failure_message: str) -> Iterator[None]:
    """Socket and TLS failures as this package's errors (authentication errors pass unchanged)."""
    try:
        yield
    except AuthenticationError:
        raise
    except ssl.SSLError as exc:
        raise _tls_failure(exc) from exc
    except httpcore.TimeoutException as exc:
        raise ChannelTimeout(timeout_message) from exc
    except (httpcore.NetworkError, OSError) as exc:
        raise TransportError(f"{failure_message}: {exc}") from exc


def _refusal(response: WSResponse) -> ChannelError:
    """The server answered the upgrade with an HTTP error: keep its JSON error code if any."""
    import json

    code = "http_error"
    with contextlib.suppress(ValueError, KeyError, TypeError, AttributeError):
        code = str(json.loads(response.body or b"")["error"]["code"])
    if response.status_code in (401, 403) and code in ("sealed_channel_required", "unknown_session"):
        return AuthenticationError(f"server refused the stream ({code})")
    return TransportError(f"server refused the stream: HTTP {response.status_code} ({code})")


class WebSocketStream(Stream):
    """One WebSocket connection carrying binary messages; see :class:`Stream`."""

    def __init__(
        self,
        *,
        host: str,
        port: int,
        path: str,
        stats: WireStats,
        ssl_context: ssl.SSLContext | None,
        timeout: float,
        headers: Mapping[str, str] | None = None,
        max_message: int = DEFAULT_MAX_MESSAGE,
    ) -> None:
        if not path.startswith("/"):
            raise ValueError("stream path must start with '/'")
        self.stats = stats
        self._timeout = timeout
        scheme = "wss" if ssl_context is not None else "ws"
        authority = f"[{host}]" if ":" in host else host
        self._ws = ClientProtocol(parse_uri(f"{scheme}://{authority}:{port}{path}"), max_size=max_message)
        self._closed = False
        self._where = f"{scheme}://{authority}:{port}{path}"
        with _translated(f"connecting to {self._where} timed out", f"cannot connect to {self._where}"):
            raw = CountingBackend(stats).connect_tcp(host, port, timeout)
            self._net = raw if ssl_context is None else raw.start_tls(ssl_context, host, timeout)
        try:
            self._upgrade(headers or {})
        except BaseException:
            self._net.close()
            raise

    def _upgrade(self, headers: Mapping[str, str]) -> None:
        request = self._ws.connect()
        for name, value in headers.items():
            request.headers[name] = value
        self._ws.send_request(request)
        self._flush()
        while self._ws.state is State.CONNECTING:
            self._read()
        events = self._ws.events_received()
        if self._ws.handshake_exc is not None:
            exc = self._ws.handshake_exc
            if isinstance(exc, InvalidStatus):
                raise _refusal(exc.response) from None
            raise TransportError(f"WebSocket upgrade failed: {exc}") from exc
        self._pending = [e for e in events if isinstance(e, Frame)]

    def _flush(self) -> None:
        data = b"".join(self._ws.data_to_send())
        if data:
            self._io(lambda: self._net.write(data, self._timeout))

    def _read(self) -> None:
        data = self._io(lambda: self._net.read(_READ_SIZE, self._timeout))
        if data:
            self._ws.receive_data(data)
        else:
            self._ws.receive_eof()
            if self._ws.state is State.CONNECTING:
                raise TransportError(f"{self._where} closed the connection during the upgrade")
        self._flush()  # answers pings and close frames

    def _io(self, op: Callable[[], bytes | None]) -> bytes:
        with _translated(
            f"no reply from {self._where} within {self._timeout} s", f"stream to {self._where} broke off"
        ):
            return op() or b""

    def send(self, message: bytes) -> None:
        """Send one binary message (one WebSocket frame)."""
        if self._closed or self._ws.state is not State.OPEN:
            raise self._closed_error()
        self._ws.send_binary(message)
        self._flush()

    def recv(self) -> bytes:
        """Return the next whole binary message from the server."""
        parts: list[bytes] = []
        while True:
            while not self._pending:
                if self._ws.state is State.CLOSED or self._closed:
                    raise self._closed_error()
                try:
                    self._read()
                except ProtocolError as exc:  # pragma: no cover - websockets reports via events
                    raise TransportError(f"bad WebSocket data from the server: {exc}") from exc
                self._pending = [e for e in self._ws.events_received() if isinstance(e, Frame)]
                if self._ws.parser_exc is not None:
                    raise TransportError(f"bad WebSocket data from the server: {self._ws.parser_exc}")
            frame = self._pending.pop(0)
            if frame.opcode is Opcode.CLOSE:
                raise self._closed_error()
            if frame.opcode is Opcode.TEXT or (frame.opcode is Opcode.CONT and not parts):
                raise TransportError("the server sent a text or stray WebSocket frame")
            if frame.opcode in (Opcode.BINARY, Opcode.CONT):
                parts.append(bytes(frame.data))
                if frame.fin:
                    return b"".join(parts)

    def _closed_error(self) -> TransportError:
        received = self._ws.close_rcvd
        if received is not None:
            return StreamClosed(received.code, received.reason)
        return TransportError(f"the stream to {self._where} is closed")

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        with contextlib.suppress(TransportError, InvalidHandshake, ProtocolError):
            if self._ws.state is State.OPEN:
                self._ws.send_close(1000, "")
                self._flush()
        self._net.close()
