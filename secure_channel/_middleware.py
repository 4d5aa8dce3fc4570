from __future__ import annotations

import asyncio
import datetime as dt
import logging
import time
from collections import Counter, OrderedDict
from collections.abc import Awaitable, Callable, MutableMapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import unquote

from secure_channel._base import Request
from secure_channel._exceptions import AuthenticationError, InvalidRecord
from secure_channel._handshake import MAX_MESSAGE, MSG1, MSG3, ServerHandshake
from secure_channel._identity import AESGCM_EXTENSION
from secure_channel._keys import Credentials
from secure_channel._ratelimit import _HandshakeLimiter
from secure_channel._records import (
    DEFAULT_REKEY_MESSAGES,
    DEFAULT_REKEY_SECONDS,
    OVERHEAD,
    SESSION_ID_SIZE,
    ServerChannel,
)
from secure_channel._routing import _request_route, _RouteMismatch, _same_route, _send_route_mismatch
from secure_channel._sealed_server import _serve_sealed_stream
from secure_channel._trust import ServerTrust
from secure_channel._wire import (
    CONTENT_TYPE,
    HANDSHAKE_PATH,
    HEALTH_PATH,
    ROUTE_HEADER,
    SECURE_PATH,
    SESSION_HEADER,
    _decode_request,
    _encode_response,
    _error_body,
    _WireFormatError,
)

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

logger = logging.getLogger("secure_channel")
HANDSHAKE_TTL_S = 30.0


class _UnknownHandshake(Exception):
    """A msg3 whose msg1 this server does not hold (never seen, expired, restarted, or in use)."""


class _TooLarge(Exception):
    pass


@dataclass
class _Session:
    channel: ServerChannel
    identity: str
    created: float
    expires: float  # the clock value at which the peer certificate expires
    route: str = ""  # the routing key the handshake bound
    busy: bool = False
    revoked: bool = False


async def _read_body(receive: Receive, limit: int) -> bytes:
    chunks, size = [], 0
    while True:
        message = await receive()
        if message["type"] != "http.request":
            raise _TooLarge  # client went away; nothing sensible to answer
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            raise _TooLarge
        chunks.append(chunk)
        if not message.get("more_body", False):
            return b"".join(chunks)


async def _respond(
    send: Send,
    status: int,
    body: bytes,
    content_type: str = "application/json",
    retry_after: int | None = None,
    route: str | None = None,
) -> None:
    headers = [
        (b"content-type", content_type.encode()),
        (b"content-length", str(len(body)).encode()),
        (b"cache-control", b"no-store"),
    ]
    if retry_after is not None:
        headers.append((b"retry-after", str(retry_after).encode()))
    if route is not None:  # handshake replies echo the routing key they arrived with
        headers.append((ROUTE_HEADER.encode(), route.encode()))
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


async def _error(send: Send, status: int, code: str, message: str) -> None:
    await _respond(send, status, _error_body(code, message))


class AESGCMMiddleware:
    """Terminates the AES-GCM channel in front of an ASGI app.

    Handles ``POST /v1/handshake`` itself, opens ``POST /v1/secure`` records, calls ``app``
    with the reconstructed inner request (the peer identity is in the scope, see
    :func:`peer_identity`) and seals the app's whole response. Every other path except
    ``GET /healthz`` gets 403 ``sealed_channel_required`` before ``app`` is reached. Sessions
    are kept in memory: at most ``max_sessions`` (oldest evicted), each for ``session_ttl_s``
    and never past the client certificate's expiry; a revoked client's sessions are dropped
    when ``credentials`` (a :class:`ServerTrust`) reloads. Handshake crypto runs on worker
    threads, at most ``max_handshakes_in_flight`` at once; each session has at most one sealed
    request in flight, and all sessions together buffer at most ``max_unauthenticated_bytes``
    of records whose tag has not been checked yet (503 beyond). ``handshake_rate`` =
    ``(per_second, burst)`` rate-limits handshakes per source address, one token per handshake.
    A WebSocket is a sealed stream (:mod:`secure_channel._sealed_server`): it must name a
    channel session and send its sealed opening within ``stream_open_timeout_s``; one identity holds
    at most ``max_streams_per_identity`` of them, so it cannot make the server buffer many
    unauthenticated openings at once.

    Routing key: the clear ``x-lambda-route`` of msg1 is bound into the handshake transcript and
    into the session; msg3, every sealed request and the stream upgrade must carry the same key,
    or get ``421 route_mismatch`` (a proxy rewrote it, or moved the session). Handshake replies
    echo the key they saw, so the client can name a rewrite.
    """

    def __init__(
        self,
        app: ASGIApp,
        credentials: Credentials | ServerTrust,
        *,
        max_sessions: int = 1024,
        session_ttl_s: float = 3600.0,
        max_body_bytes: int = 64 * 1024 * 1024,
        rekey_after_messages: int = DEFAULT_REKEY_MESSAGES,
        rekey_after_seconds: float = DEFAULT_REKEY_SECONDS,
        max_handshakes_in_flight: int = 8,
        max_unauthenticated_bytes: int = 256 * 1024 * 1024,
        handshake_rate: tuple[float, int] | None = None,
        stream_open_timeout_s: float = 30.0,
        max_streams_per_identity: int = 16,
    ) -> None:
        trust = credentials if isinstance(credentials, ServerTrust) else None
        if trust is None and isinstance(credentials, Credentials):
            if credentials.role != "server":
                raise ValueError("AESGCMMiddleware needs server credentials")
            trust = ServerTrust(credentials)
        if trust is None:
            raise TypeError("credentials must be server Credentials or a ServerTrust")
        if max_sessions < 1 or session_ttl_s <= 0 or max_body_bytes < 1:
            raise ValueError("max_sessions, session_ttl_s and max_body_bytes must be positive")
        if max_streams_per_identity < 1 or stream_open_timeout_s <= 0:
            raise ValueError("max_streams_per_identity and stream_open_timeout_s must be positive")
        if max_handshakes_in_flight < 1 or max_unauthenticated_bytes < max_body_bytes:
            raise ValueError(
                "max_handshakes_in_flight must be positive and max_unauthenticated_bytes >= max_body_bytes"
            )
        self.app = app
        self._stream_open_timeout = stream_open_timeout_s
        self._max_streams = max_streams_per_identity
        self._streams: Counter[str] = Counter()  # sealed streams per identity, opening or open
        self._trust = trust
        trust.subscribe(self._drop_identities)
        self._max_handshakes = max_handshakes_in_flight
        self._handshakes = 0
        self._max_buffered = max_unauthenticated_bytes
        self._buffered = 0
        self._limiter = _HandshakeLimiter(*handshake_rate) if handshake_rate else None
        self._max_sessions = max_sessions
        self._ttl = session_ttl_s
        self._max_body = max_body_bytes
        self._rekey = (rekey_after_messages, rekey_after_seconds)
        self._sessions: OrderedDict[bytes, _Session] = OrderedDict()
        self._pending: OrderedDict[bytes, tuple[ServerHandshake, float]] = OrderedDict()
        self._claimed: set[bytes] = set()  # pending handshakes whose msg3 is being verified
        self._clock = time.monotonic

    def _drop_identities(self, identities: frozenset[str]) -> None:
        for sid in [sid for sid, s in self._sessions.items() if s.identity in identities]:
            self._sessions.pop(sid).revoked = True

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan" or AESGCM_EXTENSION in (scope.get("extensions") or {}):
            await self.app(scope, receive, send)  # lifespan, or already unsealed by an outer instance
            return
        if scope["type"] == "websocket":
            await _serve_sealed_stream(self, scope, receive, send, self._stream_open_timeout)
            return
        if scope["type"] != "http":
            return
        method, path = scope["method"], scope["path"]
        if path == HEALTH_PATH and method in ("GET", "HEAD"):
            await self.app(scope, receive, send)
        elif path in (HANDSHAKE_PATH, SECURE_PATH) and method == "POST":
            started = False

            async def tracking_send(message: Message) -> None:
                nonlocal started
                started = True
                await send(message)

            try:
                if path == HANDSHAKE_PATH:
                    await self._handshake(scope, receive, tracking_send)
                else:
                    await self._secure(scope, receive, tracking_send)
            except Exception as exc:
                logger.error("secure channel internal error: %s", type(exc).__name__)
                if started:
                    raise
                await _error(send, 500, "internal_error", "internal server error")
        else:
            await _error(send, 403, "sealed_channel_required", "this server only accepts sealed requests")

    def _expire(self) -> None:
        now = self._clock()
        while self._pending and now - next(iter(self._pending.values()))[1] > HANDSHAKE_TTL_S:
            self._pending.popitem(last=False)
        while self._sessions and now - next(iter(self._sessions.values())).created > self._ttl:
            self._sessions.popitem(last=False)

    async def _handshake(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            body = await _read_body(receive, MAX_MESSAGE)
        except _TooLarge:
            await _error(send, 413, "payload_too_large", "handshake message too large")
            return
        self._expire()
        client = scope.get("client")
        source = str(client[0]) if client else ""
        if self._limiter is not None and not (len(body) >= 2 and body[1] == MSG3):
            wait = self._limiter.take(source, self._clock())
            if wait is not None:  # msg1 pays; the msg3 that completes a handshake does not
                await _respond(
                    send, 429, _error_body("rate_limited", "too many handshakes"), retry_after=wait
                )
                return
        if self._handshakes >= self._max_handshakes:
            body = _error_body("overloaded", "too many handshakes in progress; retry shortly")
            await _respond(send, 503, body, retry_after=1)
            return
        try:
            route = _request_route(scope)
        except ValueError:
            await _error(send, 400, "bad_route", f"{ROUTE_HEADER} must be 0-128 characters of [0-9A-Za-z_-]")
            return
        self._handshakes += 1
        try:
            reply = await self._handshake_step(body, route)
        except _RouteMismatch:
            logger.warning("aesgcm handshake routing key changed between msg1 and msg3")
            await _send_route_mismatch(send)
            return
        except _UnknownHandshake:  # e.g. msg1 went to a replica that restarted since: start again
            logger.warning("aesgcm handshake failed: unknown, expired or busy handshake")
            await _error(
                send, 401, "unknown_handshake", "unknown, expired or busy handshake; start a new one"
            )
            return
        except AuthenticationError as exc:
            logger.warning("aesgcm %s", exc)
            await _error(send, 401, "handshake_failed", "handshake failed")
            return
        finally:
            self._handshakes -= 1
        await _respond(send, 200, reply, CONTENT_TYPE, route=route)

    async def _handshake_step(self, body: bytes, route: str) -> bytes:
        # The ECDSA and X25519 work runs on a worker thread so it never stalls the event loop.
        if len(body) >= 2 and body[1] == MSG1:
            self._trust.maybe_reload()
            hs = await asyncio.to_thread(ServerHandshake, self._trust.credentials, body, route=route)
            if len(self._pending) >= self._max_sessions:
                self._pending.popitem(last=False)
            self._pending[hs.session_id] = (hs, self._clock())
            return hs.msg2
        if len(body) < 2 + SESSION_ID_SIZE or body[1] != MSG3:
            raise AuthenticationError("handshake failed: unexpected message")
        sid = body[2 : 2 + SESSION_ID_SIZE]
        entry = self._pending.get(sid)
        if entry is None or sid in self._claimed:
            raise _UnknownHandshake
        if entry[0].route != route:
            raise _RouteMismatch
        self._claimed.add(sid)
        try:  # verify first: a junk msg3 must not cancel the real client's handshake
            reply, c2s, s2c, identity = await asyncio.to_thread(entry[0].finish, body)
        finally:
            self._claimed.discard(sid)
        self._pending.pop(sid, None)
        cert = entry[0].peer_cert
        if cert is None or not self._trust.check(cert):
            raise AuthenticationError("handshake failed: client certificate revoked")
        if len(self._sessions) >= self._max_sessions:
            self._sessions.popitem(last=False)
        channel = ServerChannel(
            sid, c2s, s2c, rekey_after_messages=self._rekey[0], rekey_after_seconds=self._rekey[1]
        )
        now = self._clock()
        lifetime = (cert.not_valid_after_utc - dt.datetime.now(dt.UTC)).total_seconds()
        self._sessions[sid] = _Session(channel, identity, now, now + lifetime, route)
        return reply

    def _session(self, scope: Scope) -> tuple[bytes, _Session] | None:
        raw = dict(scope["headers"]).get(SESSION_HEADER.encode(), b"")
        try:
            sid = bytes.fromhex(raw.decode("ascii"))
        except (UnicodeDecodeError, ValueError):
            return None
        self._expire()
        session = self._sessions.get(sid)
        if session is None:
            return None
        if session.channel.exhausted or self._clock() >= session.expires:
            del self._sessions[sid]
            return None
        return sid, session

    async def _secure(self, scope: Scope, receive: Receive, send: Send) -> None:
        self._trust.maybe_reload()
        found = self._session(scope)
        if found is None:
            await _error(send, 401, "unknown_session", "unknown or expired session; handshake again")
            return
        sid, session = found
        if not _same_route(scope, session.route):
            await _send_route_mismatch(send)
            return
        if session.busy:
            await _error(send, 409, "session_busy", "one sealed request at a time per session")
            return
        session.busy = True
        try:
            await self._secure_exchange(scope, receive, send, sid, session)
        finally:
            session.busy = False

    async def _secure_exchange(
        self, scope: Scope, receive: Receive, send: Send, sid: bytes, session: _Session
    ) -> None:
        limit = self._max_body + OVERHEAD + 65536
        declared = dict(scope["headers"]).get(b"content-length", b"")
        reserve = int(declared) if declared.isdigit() and int(declared) <= limit else limit
        if self._buffered + reserve > self._max_buffered:
            await _error(send, 503, "overloaded", "too many sealed bytes awaiting authentication")
            return
        self._buffered += reserve  # reserved before reading, released once the tag is checked
        try:
            try:
                record = await _read_body(receive, reserve)
            except _TooLarge:
                await _error(send, 413, "payload_too_large", "sealed request too large")
                return
            try:
                plaintext, sequence = session.channel.open_request(record)
            except InvalidRecord:
                logger.warning("aesgcm record rejected")
                await _error(send, 400, "invalid_record", "record rejected")
                return
        finally:
            self._buffered -= reserve
        try:
            inner = _decode_request(plaintext)
            status, headers, body = await self._call_app(scope, inner, sid, session.identity)
        except (_WireFormatError, UnicodeError):
            status, headers = 400, {"content-type": "application/json"}
            body = _error_body("bad_request", "malformed inner request")
        if session.revoked:  # revoked while the app ran: no sealed answer for it any more
            await _error(send, 403, "session_revoked", "client certificate revoked")
            return
        await _respond(
            send,
            200,
            session.channel.seal_response(_encode_response(status, headers, body), sequence),
            CONTENT_TYPE,
        )

    async def _call_app(
        self, scope: Scope, inner: Request, sid: bytes, identity: str
    ) -> tuple[int, dict[str, str], bytes]:
        raw_path, _, query = inner.path.partition("?")
        headers = [(k.encode("latin-1"), v.encode("latin-1")) for k, v in inner.headers.items()]
        headers.append((b"content-length", str(len(inner.content)).encode()))
        extensions = {
            **(scope.get("extensions") or {}),
            AESGCM_EXTENSION: {"peer_identity": identity, "session_id": sid.hex()},
        }
        inner_scope = {
            **scope,
            "method": inner.method,
            "path": unquote(raw_path),
            "raw_path": raw_path.encode(),
            "query_string": query.encode(),
            "headers": headers,
            "extensions": extensions,
        }
        done = asyncio.Event()
        delivered = False

        async def inner_receive() -> Message:
            nonlocal delivered
            if not delivered:
                delivered = True
                return {"type": "http.request", "body": inner.content, "more_body": False}
            await done.wait()
            return {"type": "http.disconnect"}

        status, out_headers, chunks = 500, dict[str, str](), list[bytes]()

        async def inner_send(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                for k, v in message.get("headers", []):
                    name = k.decode("latin-1").lower()
                    if name != "content-length":
                        value = v.decode("latin-1")
                        out_headers[name] = f"{out_headers[name]}, {value}" if name in out_headers else value
            elif message["type"] == "http.response.body":
                chunks.append(message.get("body", b""))

        try:
            await self.app(inner_scope, inner_receive, inner_send)
        except Exception as exc:
            logger.error("application error behind the sealed channel: %s", type(exc).__name__)
            return (
                500,
                {"content-type": "application/json"},
                _error_body("internal_error", "internal server error"),
            )
        finally:
            done.set()
        return status, out_headers, b"".join(chunks)
