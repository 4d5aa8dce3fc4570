"""Shared machinery of the HTTP transports: an httpcore pool over the counting backend."""

from __future__ import annotations

import ssl
import weakref
from collections.abc import Mapping
from urllib.parse import urlsplit

import httpcore

from secure_channel._base import Request, Response, SecurityMode, Stream, Transport, WireStats, new_route
from secure_channel._exceptions import AuthenticationError, ChannelTimeout, TransportError
from secure_channel._net import CountingBackend, _tls_failure
from secure_channel._wire import ROUTE_HEADER

DEFAULT_TIMEOUT = 30.0
#: Default cap on one response body, enforced while reading (a hostile server cannot make us buffer more).
DEFAULT_MAX_RESPONSE_BYTES = 1 << 30
_HOP_BY_HOP = frozenset(
    {"host", "content-length", "connection", "transfer-encoding", "keep-alive", "upgrade"}
)


def _split_base_url(base_url: str, scheme: str) -> tuple[str, int]:
    """Return ``(host, port)`` of ``base_url``; raise ValueError unless it uses ``scheme``."""
    parts = urlsplit(base_url)
    if parts.scheme != scheme:
        raise ValueError(f"expected a {scheme}:// URL, got {base_url!r}")
    if not parts.hostname:
        raise ValueError(f"no host in {base_url!r}")
    if parts.path not in ("", "/") or parts.query or parts.fragment or parts.username:
        raise ValueError(f"base URL must be scheme://host[:port], got {base_url!r}")
    return parts.hostname, parts.port or (443 if scheme == "https" else 80)


def _read_capped(resp: httpcore.Response, limit: int) -> bytes:
    """The response body, refused as soon as it (declared or received) passes ``limit`` bytes."""
    declared = dict(resp.headers).get(b"content-length", b"")
    if declared.isdigit() and int(declared) > limit:
        raise TransportError(f"response of {int(declared)} bytes exceeds the {limit}-byte limit")
    chunks, size = [], 0
    for chunk in resp.iter_stream():
        size += len(chunk)
        if size > limit:
            raise TransportError(f"response exceeds the {limit}-byte limit")
        chunks.append(chunk)
    return b"".join(chunks)


class _HTTPCoreTransport(Transport):
    """Base of :class:`PlainTransport` and :class:`TLSTransport`: one keep-alive pool per transport."""

    _scheme: str

    def __init__(
        self,
        base_url: str,
        *,
        security: SecurityMode,
        ssl_context: ssl.SSLContext | None,
        timeout: float,
        max_response_bytes: int = DEFAULT_MAX_RESPONSE_BYTES,
    ) -> None:
        if timeout <= 0:
            raise ValueError("timeout must be positive")
        if max_response_bytes < 1:
            raise ValueError("max_response_bytes must be positive")
        self._max_response = max_response_bytes
        self._host, self._port = _split_base_url(base_url, self._scheme)
        self.base_url = base_url.rstrip("/")
        self.security = security
        self.stats = WireStats()
        self.route = new_route()
        self._timeout = timeout
        self._ssl_context = ssl_context
        self._pool = httpcore.ConnectionPool(
            ssl_context=ssl_context,
            max_connections=4,
            keepalive_expiry=60.0,
            network_backend=CountingBackend(self.stats),
        )
        self._closed = False
        self._streams: weakref.WeakSet[Stream] = weakref.WeakSet()

    @property
    def host(self) -> str:
        return self._host

    def reroute(self) -> str:
        self.route = new_route()
        return self.route

    def _with_route(self, headers: Mapping[str, str] | None) -> dict[str, str]:
        """``headers`` plus this transport's routing key, unless they name one already."""
        out = dict(headers or {})
        if not any(k.lower() == ROUTE_HEADER for k in out):
            out[ROUTE_HEADER] = self.route
        return out

    def exchange(self, request: Request) -> Response:
        """Send ``request`` over HTTP/1.1 on a pooled connection and read the whole response."""
        if self._closed:
            raise TransportError("transport is closed")
        if not request.path.startswith("/"):
            raise ValueError("request path must start with '/'")
        routed = self._with_route(request.headers)
        headers = [(k, v) for k, v in routed.items() if k.lower() not in _HOP_BY_HOP]
        timeouts = {"connect": self._timeout, "read": self._timeout, "write": self._timeout}
        limit = min(request.max_response_bytes or self._max_response, self._max_response)
        try:
            with self._pool.stream(
                request.method,
                httpcore.URL(scheme=self._scheme, host=self._host, port=self._port, target=request.path),
                headers=headers,
                content=request.content,
                extensions={"timeout": {**timeouts, "pool": self._timeout}},
            ) as resp:
                content = _read_capped(resp, limit)
        except AuthenticationError:
            raise
        except ssl.SSLError as exc:
            raise _tls_failure(exc) from exc
        except httpcore.TimeoutException as exc:
            raise ChannelTimeout(f"{type(exc).__name__} talking to {self.base_url}") from exc
        except (httpcore.NetworkError, httpcore.ProtocolError, httpcore.UnsupportedProtocol, OSError) as exc:
            raise TransportError(f"{type(exc).__name__} talking to {self.base_url}: {exc}") from exc
        out_headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in resp.headers}
        return Response(status=resp.status, content=content, headers=out_headers)

    def open_stream(self, path: str, headers: Mapping[str, str] | None = None) -> Stream:
        """A WebSocket on a new connection, with this transport's TLS context and byte counters;
        closed when the transport is."""
        from secure_channel._ws import WebSocketStream

        if self._closed:
            raise TransportError("transport is closed")
        stream = WebSocketStream(
            host=self._host,
            port=self._port,
            path=path,
            stats=self.stats,
            ssl_context=self._ssl_context,
            timeout=self._timeout,
            headers=self._with_route(headers),
            max_message=self._max_response,
        )
        self._streams.add(stream)
        return stream

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            for stream in list(self._streams):  # closing the transport closes its streams
                stream.close()
            self._pool.close()
