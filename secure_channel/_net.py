"""An httpcore network backend that counts the bytes that really cross the TCP socket.

TLS runs in memory (``ssl.SSLObject`` over two ``MemoryBIO``) on top of the counted raw
stream, so handshakes, record headers, tags and alerts are all counted.
"""

from __future__ import annotations

import contextlib
import functools
import ssl
from collections.abc import Callable, Iterable
from typing import Any, TypeVar

import httpcore

from secure_channel._base import WireStats
from secure_channel._exceptions import AuthenticationError

_T = TypeVar("_T")
_READ_SIZE = 65536


def _tls_failure(exc: ssl.SSLError) -> AuthenticationError:
    """Translate an ssl error into AuthenticationError with a short, non-leaky reason."""
    reason = getattr(exc, "verify_message", None) or getattr(exc, "reason", None) or type(exc).__name__
    return AuthenticationError(f"TLS failure: {str(reason).lower().replace('_', ' ')}")


class _CountingStream(httpcore.NetworkStream):
    """Wraps a raw TCP stream; every byte read or written is added to ``stats``."""

    def __init__(self, inner: httpcore.NetworkStream, stats: WireStats) -> None:
        self._inner = inner
        self._stats = stats

    def read(self, max_bytes: int, timeout: float | None = None) -> bytes:
        data = self._inner.read(max_bytes, timeout)
        self._stats.bytes_received += len(data)
        return data

    def write(self, buffer: bytes, timeout: float | None = None) -> None:
        self._inner.write(buffer, timeout)
        self._stats.bytes_sent += len(buffer)

    def close(self) -> None:
        self._inner.close()

    def start_tls(
        self, ssl_context: ssl.SSLContext, server_hostname: str | None = None, timeout: float | None = None
    ) -> httpcore.NetworkStream:
        return _MemoryTLSStream(self, ssl_context, server_hostname, timeout)

    def get_extra_info(self, info: str) -> Any:
        return self._inner.get_extra_info(info)


class _MemoryTLSStream(httpcore.NetworkStream):
    """TLS client over any :class:`httpcore.NetworkStream`, driven through memory BIOs."""

    def __init__(
        self,
        raw: httpcore.NetworkStream,
        ctx: ssl.SSLContext,
        server_hostname: str | None,
        timeout: float | None,
    ) -> None:
        self._raw = raw
        self._in = ssl.MemoryBIO()
        self._out = ssl.MemoryBIO()
        self._ssl = ctx.wrap_bio(self._in, self._out, server_side=False, server_hostname=server_hostname)
        self._answered = False
        try:
            self._io(self._ssl.do_handshake, timeout)
        except BaseException:
            raw.close()
            raise

    def _flush(self, timeout: float | None) -> None:
        pending = self._out.read()
        if pending:
            self._raw.write(pending, timeout)

    def _io(self, op: Callable[[], _T], timeout: float | None) -> _T:
        try:
            return self._pump(op, timeout)
        except (ssl.SSLEOFError, httpcore.ReadError, httpcore.WriteError) as exc:
            if self._answered:
                raise httpcore.ReadError(f"TLS connection lost: {exc}") from exc
            # asyncio servers (uvicorn) drop a refused TLS client without flushing the alert,
            # so a fresh connection that is closed or reset before any answer is a refusal.
            raise AuthenticationError(
                "TLS failure: the server closed the connection before answering "
                "(client certificate or TLS version refused)"
            ) from exc

    def _pump(self, op: Callable[[], _T], timeout: float | None) -> _T:
        while True:
            try:
                result = op()
            except ssl.SSLWantReadError:
                self._flush(timeout)
                data = self._raw.read(_READ_SIZE, timeout)
                if data:
                    self._in.write(data)
                else:
                    self._in.write_eof()
                continue
            except ssl.SSLZeroReturnError:
                self._flush(timeout)
                raise
            except ssl.SSLEOFError:
                raise
            except ssl.SSLError as exc:
                self._flush(timeout)  # deliver our alert to the peer
                raise _tls_failure(exc) from exc
            self._flush(timeout)
            return result

    def read(self, max_bytes: int, timeout: float | None = None) -> bytes:
        try:
            data = self._io(functools.partial(self._ssl.read, max_bytes), timeout)
        except ssl.SSLZeroReturnError:
            return b""
        self._answered = self._answered or bool(data)
        return data

    def write(self, buffer: bytes, timeout: float | None = None) -> None:
        view = memoryview(buffer)
        while view:
            sent = self._io(functools.partial(self._ssl.write, view), timeout)
            view = view[sent:]

    def close(self) -> None:
        with contextlib.suppress(ssl.SSLError, ValueError):
            self._ssl.unwrap()
        with contextlib.suppress(httpcore.NetworkError, httpcore.TimeoutException, OSError):
            self._raw.write(self._out.read())
        self._raw.close()

    def start_tls(
        self, ssl_context: ssl.SSLContext, server_hostname: str | None = None, timeout: float | None = None
    ) -> httpcore.NetworkStream:
        return _MemoryTLSStream(self, ssl_context, server_hostname, timeout)

    def get_extra_info(self, info: str) -> Any:
        if info == "ssl_object":
            return self._ssl
        if info == "is_readable":
            return self._in.pending > 0 or bool(self._raw.get_extra_info("is_readable"))
        return self._raw.get_extra_info(info)


class CountingBackend(httpcore.NetworkBackend):
    """A sync httpcore backend whose connections add their socket traffic to ``stats``."""

    def __init__(self, stats: WireStats) -> None:
        self.stats = stats
        self._inner = httpcore.SyncBackend()

    def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,
        local_address: str | None = None,
        socket_options: Iterable[Any] | None = None,
    ) -> httpcore.NetworkStream:
        stream = self._inner.connect_tcp(host, port, timeout, local_address, socket_options)
        return _CountingStream(stream, self.stats)

    def connect_unix_socket(
        self, path: str, timeout: float | None = None, socket_options: Iterable[Any] | None = None
    ) -> httpcore.NetworkStream:
        raise httpcore.ConnectError("unix sockets are not supported by secure_channel")

    def sleep(self, seconds: float) -> None:
        self._inner.sleep(seconds)
