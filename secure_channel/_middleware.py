from __future__ import annotations

import asyncio
import logging
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, MutableMapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import unquote

from secure_channel._base import Request
from secure_channel._exceptions import AuthenticationError, InvalidRecord
from secure_channel._handshake import MAX_MESSAGE, MSG1, MSG3, ServerHandshake
from secure_channel._identity import AESGCM_EXTENSION
from secure_channel._keys import Credentials
from secure_channel._records import (
    DEFAULT_REKEY_MESSAGES,
    DEFAULT_REKEY_SECONDS,
    OVERHEAD,
    SESSION_ID_SIZE,
    ServerChannel,
)
from secure_channel._wire import (
    CONTENT_TYPE,
    HANDSHAKE_PATH,
    HEALTH_PATH,
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


class _TooLarge(Exception):
    pass


@dataclass
class _Session:
    channel: ServerChannel
    identity: str
    created: float


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


async def _respond(send: Send, status: int, body: bytes, content_type: str = "application/json") -> None:
    headers = [
        (b"content-type", content_type.encode()),
        (b"content-length", str(len(body)).encode()),
        (b"cache-control", b"no-store"),
    ]
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
    are kept in memory: at most ``max_sessions`` (oldest evicted), each for ``session_ttl_s``.
    """

    def __init__(
        self,
        app: ASGIApp,
        credentials: Credentials,
        *,
        max_sessions: int = 1024,
        session_ttl_s: float = 3600.0,
        max_body_bytes: int = 64 * 1024 * 1024,
        rekey_after_messages: int = DEFAULT_REKEY_MESSAGES,
        rekey_after_seconds: float = DEFAULT_REKEY_SECONDS,
    ) -> None:
        if credentials.role != "server":
            raise ValueError("AESGCMMiddleware needs server credentials")
        if max_sessions < 1 or session_ttl_s <= 0 or max_body_bytes < 1:
            raise ValueError("max_sessions, session_ttl_s and max_body_bytes must be positive")
        self.app = app
        self._creds = credentials
        self._max_sessions = max_sessions
        self._ttl = session_ttl_s
        self._max_body = max_body_bytes
        self._rekey = (rekey_after_messages, rekey_after_seconds)
        self._sessions: OrderedDict[bytes, _Session] = OrderedDict()
        self._pending: OrderedDict[bytes, tuple[ServerHandshake, float]] = OrderedDict()
        self._clock = time.monotonic

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan" or AESGCM_EXTENSION in (scope.get("extensions") or {}):
            await self.app(scope, receive, send)  # lifespan, or already unsealed by an outer instance
            return
        if scope["type"] != "http":
            await send({"type": "websocket.close", "code": 1008})
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
                    await self._handshake(receive, tracking_send)
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

    async def _handshake(self, receive: Receive, send: Send) -> None:
        try:
            body = await _read_body(receive, MAX_MESSAGE)
        except _TooLarge:
            await _error(send, 413, "payload_too_large", "handshake message too large")
            return
        self._expire()
        try:
            if len(body) >= 2 and body[1] == MSG1:
                hs = ServerHandshake(self._creds, body)
                if len(self._pending) >= self._max_sessions:
                    self._pending.popitem(last=False)
                self._pending[hs.session_id] = (hs, self._clock())
                reply = hs.msg2
            elif len(body) >= 2 + SESSION_ID_SIZE and body[1] == MSG3:
                entry = self._pending.pop(body[2 : 2 + SESSION_ID_SIZE], None)
                if entry is None:
                    raise AuthenticationError("handshake failed: unknown or expired handshake")
                reply, c2s, s2c, identity = entry[0].finish(body)
                sid = entry[0].session_id
                if len(self._sessions) >= self._max_sessions:
                    self._sessions.popitem(last=False)
                channel = ServerChannel(
                    sid, c2s, s2c, rekey_after_messages=self._rekey[0], rekey_after_seconds=self._rekey[1]
                )
                self._sessions[sid] = _Session(channel, identity, self._clock())
            else:
                raise AuthenticationError("handshake failed: unexpected message")
        except AuthenticationError as exc:
            logger.warning("aesgcm %s", exc)
            await _error(send, 401, "handshake_failed", "handshake failed")
            return
        await _respond(send, 200, reply, CONTENT_TYPE)

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
        if session.channel.exhausted:
            del self._sessions[sid]
            return None
        return sid, session

    async def _secure(self, scope: Scope, receive: Receive, send: Send) -> None:
        found = self._session(scope)
        if found is None:
            await _error(send, 401, "unknown_session", "unknown or expired session; handshake again")
            return
        sid, session = found
        try:
            record = await _read_body(receive, self._max_body + OVERHEAD + 65536)
        except _TooLarge:
            await _error(send, 413, "payload_too_large", "sealed request too large")
            return
        try:
            plaintext, sequence = session.channel.open_request(record)
            inner = _decode_request(plaintext)
        except (InvalidRecord, _WireFormatError):
            logger.warning("aesgcm record rejected")
            await _error(send, 400, "invalid_record", "record rejected")
            return
        status, headers, body = await self._call_app(scope, inner, sid, session.identity)
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
