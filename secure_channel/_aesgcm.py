from __future__ import annotations

import random
import threading
import time
from collections.abc import Mapping

from secure_channel._base import Request, Response, SecurityMode, Stream, Transport, new_route
from secure_channel._exceptions import (
    AuthenticationError,
    InvalidRecord,
    ServerBusy,
    SessionLost,
    StreamClosed,
    TransportError,
)
from secure_channel._handshake import MAX_MESSAGE, ClientHandshake, _route_context
from secure_channel._keys import Credentials
from secure_channel._records import DEFAULT_REKEY_MESSAGES, DEFAULT_REKEY_SECONDS, OVERHEAD, ClientChannel
from secure_channel._sealed_stream import SealedStream
from secure_channel._wire import (
    CONTENT_TYPE,
    HANDSHAKE_PATH,
    ROUTE_HEADER,
    SECURE_PATH,
    SESSION_HEADER,
    _decode_response,
    _encode_request,
    _WireFormatError,
)

_OUTER = {"plain": "aesgcm", "tls": "tls+aesgcm"}
#: Requests safe to send twice. Error replies outside the channel are unauthenticated, so after
#: one the client cannot know whether the request already ran; only these are re-sent.
_RESPONSE_META = 64 * 1024  # status and headers inside a sealed response
IDEMPOTENT_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
ROUTE_MISMATCH = "route_mismatch"
#: A handshake message refused for now (``503 overloaded``: the server's cap on handshakes in
#: flight; ``429 rate_limited``: its per-source handshake rate) is sent again, at most this many
#: more times, after the server's ``Retry-After`` or, without one, a backoff from 0.1 s doubling;
#: a quarter of jitter on top, so clients refused together part. A server that asks for more than
#: ``_BUSY_MAX_WAIT_S`` gets no retry: the caller hears ServerBusy at once.
_BUSY_RETRIES = 4
_BUSY_MAX_WAIT_S = 5.0
_BUSY = {(503, "overloaded"), (429, "rate_limited")}
_sleep = time.sleep  # tests replace it


def _retry_after(response: Response) -> float | None:
    value = response.headers.get("retry-after", "")
    try:
        seconds = float(value)
    except ValueError:
        return None
    return seconds if 0 <= seconds < float("inf") else None


def _route_error(sent: str, seen: str | None = None) -> AuthenticationError:
    said = "" if seen is None else f" (sent {sent!r}, the server saw {seen!r})"
    return AuthenticationError(
        f"the routing key {ROUTE_HEADER} was rewritten on the way, or the session was moved to "
        f"another server{said}: the channel is bound to its key, so this is refused"
    )


def _error_code(response: Response) -> str:
    try:
        code = response.json()["error"]["code"]
    except (ValueError, KeyError, TypeError):
        return "unknown"
    return code if isinstance(code, str) else "unknown"


class _HandshakeLost(AuthenticationError):
    """The server answered msg3 with ``401 unknown_handshake``: it does not hold the msg1 (any more)."""


class AESGCMTransport(Transport):
    """Application-layer AES-256-GCM with mutual authentication, over any inner transport.

    The whole request (method, path, headers, body) travels as one sealed record in a
    ``POST /v1/secure``; the response comes back the same way. A SIGMA-I handshake
    (two round trips, see SECURITY.md) runs on first use, when the server forgets the
    session, and when the record counters run out. A reply of ``401 unknown_session`` is
    not authenticated (anyone on the path can forge one), so only idempotent requests are
    re-sent after it; any other raises :class:`SessionLost` and the next exchange handshakes again.

    Every request carries the inner transport's routing key (:attr:`route`) in the clear, and the
    handshake binds it into the channel keys; the server refuses a sealed request or stream
    whose key differs from its channel's (``421 route_mismatch``), and this transport then raises
    :class:`AuthenticationError` naming the routing key.
    """

    def __init__(
        self,
        inner: Transport,
        credentials: Credentials,
        *,
        server_name: str | None = None,
        rekey_after_messages: int = DEFAULT_REKEY_MESSAGES,
        rekey_after_seconds: float = DEFAULT_REKEY_SECONDS,
    ) -> None:
        """``inner`` is a plain or TLS transport; ``credentials`` the client credentials.

        ``server_name`` is the name the server certificate must carry; it defaults to the
        host of ``inner`` (its ``host`` attribute).
        """
        if inner.security not in _OUTER:
            raise ValueError(f"AESGCMTransport needs a plain or tls inner transport, got {inner.security}")
        if credentials.role != "client":
            raise ValueError("AESGCMTransport needs client credentials")
        name = server_name or getattr(inner, "host", None)
        if not isinstance(name, str) or not name:
            raise ValueError("server_name is required when the inner transport has no host")
        self.security: SecurityMode = _OUTER[inner.security]  # type: ignore[assignment]
        self.stats = inner.stats
        # The key is this transport's own (the inner one's to start with): every request it sends
        # names it explicitly, so a wrapper put under it later cannot change it.
        self._route = getattr(inner, "route", "") or new_route()
        _route_context(self._route)  # a bad routing key fails here
        self.inner = inner
        self.peer_identity: str | None = None
        self._creds = credentials
        self._server_name = name
        self._rekey = (rekey_after_messages, rekey_after_seconds)
        self._channel: ClientChannel | None = None
        self._lock = threading.Lock()
        # Build a throw-away channel so bad rekey bounds fail here, not on first use.
        ClientChannel(
            bytes(16),
            bytes(32),
            bytes(32),
            rekey_after_messages=rekey_after_messages,
            rekey_after_seconds=rekey_after_seconds,
        )

    @property
    def route(self) -> str:  # type: ignore[override]
        return self._route

    def reroute(self) -> str:
        with self._lock:
            self._channel = None
            self._route = new_route()
            return self._route

    def _post(
        self,
        path: str,
        body: bytes,
        route: str,
        headers: dict[str, str] | None = None,
        limit: int | None = None,
    ) -> Response:
        all_headers = {"content-type": CONTENT_TYPE, **(headers or {}), ROUTE_HEADER: route}
        return self.inner.exchange(Request("POST", path, body, all_headers, max_response_bytes=limit))

    def handshake(self) -> None:
        """Run a fresh handshake now (it also runs lazily). Raises AuthenticationError."""
        with self._lock:
            self._handshake()

    def _handshake(self) -> None:
        self._channel = None
        self._channel = self._new_channel(self.route)

    def _new_channel(self, route: str | None = None) -> ClientChannel:
        route = self.route if route is None else route
        for attempt in (0, 1):
            hs = ClientHandshake(self._creds, self._server_name, route=route)
            msg3 = hs.process_msg2(self._handshake_step(hs.start(), route))
            try:
                sid, c2s, s2c = hs.finish(self._handshake_step(msg3, route))
                break
            except _HandshakeLost:
                # The server no longer holds our msg1 (say, a replica restarted between the two
                # round trips). The reply is unauthenticated, so it earns one fresh handshake, no more.
                if attempt:
                    raise
        else:  # pragma: no cover - the loop breaks or raises
            raise AuthenticationError("handshake failed")
        self.peer_identity = hs.peer_identity
        channel = ClientChannel(
            sid, c2s, s2c, rekey_after_messages=self._rekey[0], rekey_after_seconds=self._rekey[1]
        )
        channel.route = route
        return channel

    def open_stream(self, path: str, headers: Mapping[str, str] | None = None) -> Stream:
        """A stream of sealed records (see :mod:`secure_channel._sealed_stream`) over the inner
        transport's stream, on a channel session of its own: a fresh handshake, whose session id
        the upgrade request names. The routing key is the one in ``headers`` if any, else
        :attr:`route`; the handshake requests and the upgrade carry it and bind it, and the first
        record binds it again with ``path``."""
        given = {k.lower(): v for k, v in (headers or {}).items()}
        route = given.get(ROUTE_HEADER) or self.route
        _route_context(route)
        with self._lock:
            channel = self._new_channel(route)
        all_headers = {**given, ROUTE_HEADER: route, SESSION_HEADER: channel.session_id.hex()}
        inner = self.inner.open_stream(path, all_headers)
        try:
            return SealedStream(inner, channel, path, route)
        except StreamClosed as exc:
            inner.close()
            if exc.reason == ROUTE_MISMATCH:
                raise _route_error(route) from exc
            raise
        except BaseException:
            inner.close()
            raise

    def _handshake_step(self, message: bytes, route: str) -> bytes:
        for attempt in range(_BUSY_RETRIES + 1):
            response = self._post(HANDSHAKE_PATH, message, route, limit=MAX_MESSAGE)
            if (response.status, _error_code(response)) not in _BUSY:
                break
            wait = _retry_after(response)
            if attempt == _BUSY_RETRIES or (wait is not None and wait > _BUSY_MAX_WAIT_S):
                raise ServerBusy(
                    f"the server refused the handshake for now ({_error_code(response)}, "
                    f"{_BUSY_RETRIES + 1} attempts); try again later",
                    retry_after=wait,
                )
            base = min(_BUSY_MAX_WAIT_S, 0.1 * 2.0**attempt if wait is None else wait)
            _sleep(base * (1.0 + 0.25 * random.random()))
        seen = response.headers.get(ROUTE_HEADER)
        if (seen is not None and seen != route) or _error_code(response) == ROUTE_MISMATCH:
            raise _route_error(route, seen)
        if response.status == 401 and _error_code(response) == "unknown_handshake":
            raise _HandshakeLost("server refused the handshake (unknown_handshake)")
        if response.status != 200:
            raise AuthenticationError(f"server refused the handshake ({_error_code(response)})")
        return response.content

    def exchange(self, request: Request) -> Response:
        """Seal ``request``, send it, open and return the response (see :meth:`Transport.exchange`).

        Raises InvalidRecord if the response does not authenticate, AuthenticationError if
        the handshake fails, and TransportError for anything below.
        """
        plaintext = _encode_request(request)
        with self._lock:
            for attempt in (0, 1):
                if self._channel is None or self._channel.exhausted:
                    self._handshake()
                channel = self._channel
                if channel is None:
                    raise AuthenticationError("no session")
                record, sequence = channel.seal_request(plaintext)
                limit = request.max_response_bytes
                limit = None if limit is None else limit + OVERHEAD + _RESPONSE_META
                response = self._post(
                    SECURE_PATH, record, channel.route, {SESSION_HEADER: channel.session_id.hex()}, limit
                )
                if response.status == 200:
                    try:
                        return _decode_response(channel.open_response(response.content, sequence))
                    except _WireFormatError as exc:
                        raise TransportError("server sent a malformed sealed response") from exc
                code = _error_code(response)
                if code == ROUTE_MISMATCH:
                    self._channel = None
                    raise _route_error(channel.route)
                if response.status == 401 and code == "unknown_session":
                    self._channel = None
                    if request.method.upper() not in IDEMPOTENT_METHODS:
                        raise SessionLost(
                            "the server did not recognise the channel session (an unauthenticated "
                            f"reply); {request.method} {request.path} was not re-sent because it may "
                            "already have run"
                        )
                    if attempt == 0:
                        continue
                if code == "invalid_record":
                    raise InvalidRecord("server rejected the sealed request")
                raise TransportError(f"sealed exchange failed: HTTP {response.status} ({code})")
        raise AuthenticationError("server keeps forgetting the session")

    def close(self) -> None:
        with self._lock:
            self._channel = None
        self.inner.close()
