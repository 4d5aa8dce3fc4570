"""The trunk stream: one WebSocket per device connection, one binary message per step each way.

The messages (``lambda_split.protocol``, *Stream API*) reach this endpoint already opened by
whatever security layer sits below it (TLS in the transport, AES-GCM records in
:class:`AESGCMMiddleware`); it calls the same :class:`TrunkService` methods as the HTTP routes.
The identity is read once, when the stream opens, and owns every session the stream carries.
Who waits: the stream's own loop, for the next message (idle deadline) and for its step to
run on a worker thread; nothing else waits on a stream.
"""

from __future__ import annotations

import contextlib
import json
import math
import time
from collections import Counter, OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

from anyio import to_thread
from starlette.types import Receive, Scope, Send

from lambda_split import ServiceError, TrunkService
from lambda_split.protocol import FrameError, StreamOp, frame_session_id
from server.drain import DRAINING, DRAINING_MESSAGE, Drain
from server.observability import LOGGER

POLICY, TOO_BIG, NOT_BINARY = 1008, 1009, 1003


@dataclass(frozen=True)
class StreamLimits:
    """Bounds on streams. ``idle_timeout_s`` is the longest wait for the next message (a slow or
    silent sender is closed after it); ``rate_per_s``/``burst`` is a token bucket per identity over
    all its streams, one token per message."""

    max_message_bytes: int = 64 * 1024 * 1024 + 64 * 1024
    idle_timeout_s: float = 300.0
    rate_per_s: float = 200.0
    burst: int = 400
    max_streams: int = 256
    max_streams_per_identity: int = 16
    max_sessions_per_stream: int = 4

    def __post_init__(self) -> None:
        if min(self.max_message_bytes, self.max_streams, self.max_streams_per_identity) < 1:
            raise ValueError("stream limits must be positive")
        if self.max_sessions_per_stream < 1 or self.burst < 1:
            raise ValueError("stream limits must be positive")
        if not (self.idle_timeout_s > 0 and self.rate_per_s > 0):
            raise ValueError("stream deadlines and rates must be positive")


class _Closed(Exception):
    def __init__(self, code: int, reason: str) -> None:
        self.code, self.reason = code, reason


def _error(status: int, code: str, message: str) -> bytes:
    body = {"status": status, "error": {"code": code, "message": message}}
    return bytes((StreamOp.ERROR,)) + json.dumps(body).encode()


async def _deny(send: Send, status: int, code: str, message: str) -> None:
    """Refuse the upgrade with a JSON HTTP error (ASGI websocket.http.response), before accepting."""
    body = json.dumps({"error": {"code": code, "message": message}}).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    await send({"type": "websocket.http.response.start", "status": status, "headers": headers})
    await send({"type": "websocket.http.response.body", "body": body})


class TrunkStreamEndpoint:
    """The ASGI app behind ``GET /v1/stream``."""

    def __init__(
        self,
        service: TrunkService,
        limits: StreamLimits,
        owner_of: Callable[[Scope], str],
        client_key: Callable[[Scope], str],
        drain: Drain | None = None,
    ) -> None:
        self.service = service
        self.drain = drain
        self.limits = limits
        self.owner_of = owner_of
        self.client_key = client_key
        self.open_streams: Counter[str] = Counter()
        self._buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if (await receive())["type"] != "websocket.connect":
            return
        owner, key = self.owner_of(scope), self.client_key(scope)
        if self.drain is not None and self.drain.draining:
            await _deny(send, 503, DRAINING, DRAINING_MESSAGE)
            return
        if sum(self.open_streams.values()) >= self.limits.max_streams:
            await _deny(send, 503, "too_many_streams", "the server holds its maximum number of streams")
            return
        if self.open_streams[key] >= self.limits.max_streams_per_identity:
            await _deny(
                send, 429, "too_many_streams_for_identity", "this identity holds its maximum of streams"
            )
            return
        self.open_streams[key] += 1
        sessions: dict[str, int] = {}  # session id -> its handle on this stream
        try:
            await send({"type": "websocket.accept"})
            await self._serve(receive, send, owner, key, sessions)
        except _Closed as closed:
            LOGGER.info("stream closed", extra={"fields": {"code": closed.code, "reason": closed.reason}})
            await send({"type": "websocket.close", "code": closed.code, "reason": closed.reason})
        finally:
            self.open_streams[key] -= 1
            if not self.open_streams[key]:
                del self.open_streams[key]
            for session_id in sessions:  # a stream's sessions end with it
                with contextlib.suppress(ServiceError):
                    self.service.close_session(owner, session_id)

    async def _next(self, receive: Receive) -> bytes | None:
        import anyio

        with anyio.move_on_after(self.limits.idle_timeout_s) as scope:
            message = await receive()
        if scope.cancel_called:
            raise _Closed(POLICY, f"no message within {self.limits.idle_timeout_s} s")
        if message["type"] == "websocket.disconnect":
            return None
        data = message.get("bytes")
        if data is None:
            raise _Closed(NOT_BINARY, "binary messages only")
        if len(data) > self.limits.max_message_bytes:
            raise _Closed(TOO_BIG, "message too large")
        return bytes(data)

    async def _serve(
        self, receive: Receive, send: Send, owner: str, key: str, sessions: dict[str, int]
    ) -> None:
        while (data := await self._next(receive)) is not None:
            if not data or data[0] not in (StreamOp.OPEN, StreamOp.STEP, StreamOp.CLOSE, StreamOp.BOUND_STEP):
                raise _Closed(POLICY, "unknown message")
            wait = self._take(key)
            if wait is not None:
                reply = _error(429, "rate_limited", f"too many messages; retry in {wait} s")
            else:
                try:
                    reply = await self._handle(StreamOp(data[0]), data[1:], owner, sessions)
                except ServiceError as exc:
                    reply = _error(exc.status, exc.code, exc.message)
                except Exception as exc:
                    LOGGER.error(
                        "internal error", extra={"fields": {"route": "stream", "type": type(exc).__name__}}
                    )
                    reply = _error(500, "internal_error", "the server failed to handle this message")
            await send({"type": "websocket.send", "bytes": reply})

    async def _handle(self, op: StreamOp, body: bytes, owner: str, sessions: dict[str, int]) -> bytes:
        if op in (StreamOp.STEP, StreamOp.BOUND_STEP):
            session_id, frame = _step_target(op, body, sessions)
            out = await to_thread.run_sync(self.service.step, owner, session_id, frame)
            return bytes((op,)) + out
        if op is StreamOp.OPEN:
            if len(sessions) >= self.limits.max_sessions_per_stream:
                raise ServiceError(429, "too_many_sessions_on_stream", "close a session on this stream first")
            try:
                request = json.loads(body or b"{}")
                wire = request.get("wire", "fp32") if isinstance(request, dict) else None
                receipts = request.get("receipts", False) if isinstance(request, dict) else None
                head_depth = request.get("head_depth") if isinstance(request, dict) else None
            except (ValueError, UnicodeDecodeError):
                wire = receipts = head_depth = None
            if not isinstance(wire, str) or not isinstance(receipts, bool):
                raise ServiceError(
                    400, "bad_request", 'body must be JSON like {"wire": "fp16", "receipts": false}'
                )
            if self.drain is not None:
                self.drain.check()
            reply = self.service.open_session(owner, wire, receipts=receipts, head_depth=head_depth)
            handle = min(set(range(1, 256)) - set(sessions.values()))  # at most 4 are taken
            sessions[reply["session_id"]] = handle
            LOGGER.info("session opened", extra={"fields": {"client": owner, "wire": wire, "path": "stream"}})
            return bytes((StreamOp.OPEN,)) + json.dumps({**reply, "handle": handle}).encode()
        session_id = body.decode("ascii", "replace")
        self.service.close_session(owner, session_id)
        sessions.pop(session_id, None)
        return bytes((StreamOp.CLOSE,)) + b'{"closed": true}'

    def _take(self, key: str) -> int | None:
        """One token from ``key``'s bucket; the seconds to wait if it is empty."""
        now = time.monotonic()
        tokens, last = self._buckets.pop(key, (float(self.limits.burst), now))
        tokens = min(float(self.limits.burst), tokens + (now - last) * self.limits.rate_per_s)
        if tokens < 1.0:
            self._buckets[key] = (tokens, now)
            return math.ceil((1.0 - tokens) / self.limits.rate_per_s)
        self._buckets[key] = (tokens - 1.0, now)
        while len(self._buckets) > 10_000:
            self._buckets.popitem(last=False)
        return None


def _step_target(op: StreamOp, body: bytes, sessions: dict[str, int]) -> tuple[str, bytes]:
    """``(session id, frame)`` of a STEP (the frame names its session) or BOUND_STEP (a handle of
    this stream does, and the frame leaves the id out or repeats it) message."""
    if op is StreamOp.BOUND_STEP:
        handle = body[0] if body else 0
        session_id = next((sid for sid, h in sessions.items() if h == handle), None)
        if session_id is None:
            raise ServiceError(404, "session_not_found", "no session with this handle on this stream")
        return session_id, body[1:]
    try:
        raw = frame_session_id(body)
    except FrameError as exc:
        raise ServiceError(400, "bad_frame", str(exc)) from None
    if raw is None:
        raise ServiceError(400, "bad_frame", "a STEP frame must carry its session id (or use BOUND_STEP)")
    return raw.hex(), body
