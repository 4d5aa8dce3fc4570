"""The server end of a sealed stream (format in :mod:`secure_channel._sealed_stream`).

:class:`AESGCMMiddleware` hands every WebSocket scope here. The upgrade must name a live
channel session (``x-lambda-session``, from a handshake over HTTP); the first message must be
the sealed opening that binds the path and the routing key (a key that differs from the
upgrade's, which a proxy hashed on, closes the stream with 1008 ``route_mismatch``). Only then does the app see the
stream, with the peer identity in its scope and every message already opened; whatever it
sends is sealed and bound to the request it answers, and sent at once (a record sealed out of
step with the stream fails loudly instead of going out). Any message that does not open (too
short, an epoch byte out of step, a failed tag: a replayed, reordered, dropped or old-format
message among them) closes the stream with 1008 ``invalid_record``. The channel session belongs
to the stream from then on (a sealed HTTP request naming it gets 409) and is dropped when it ends.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections import deque
from typing import TYPE_CHECKING, Any

from secure_channel._exceptions import ChannelError, InvalidRecord
from secure_channel._identity import AESGCM_EXTENSION
from secure_channel._records import FRAME_REQUEST
from secure_channel._routing import ROUTE_MISMATCH
from secure_channel._sealed_stream import OPEN_ACK, _expand, _InStep, _opening
from secure_channel._wire import ROUTE_HEADER, _error_body

if TYPE_CHECKING:
    from secure_channel._middleware import AESGCMMiddleware, Message, Receive, Scope, Send, _Session

logger = logging.getLogger("secure_channel")
#: WebSocket close code for a policy violation (RFC 6455 §7.4.1).
POLICY = 1008
UNSUPPORTED = 1003
TRY_AGAIN_LATER = 1013


async def _deny(send: Send, status: int, code: str, message: str) -> None:
    """Refuse the upgrade with an HTTP error (ASGI websocket.http.response) before accepting."""
    body = _error_body(code, message)
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    await send({"type": "websocket.http.response.start", "status": status, "headers": headers})
    await send({"type": "websocket.http.response.body", "body": body})


async def _serve_sealed_stream(
    gate: AESGCMMiddleware, scope: Scope, receive: Receive, send: Send, open_timeout_s: float
) -> None:
    if (await receive())["type"] != "websocket.connect":
        return
    gate._trust.maybe_reload()
    found = gate._session(scope)
    if found is None:
        await _deny(send, 401, "unknown_session", "unknown or expired session; handshake again")
        return
    sid, session = found
    if session.busy:
        await _deny(send, 409, "session_busy", "this channel session is already in use")
        return
    if gate._streams[session.identity] >= gate._max_streams:
        await _deny(send, 429, "too_many_streams_for_identity", "this identity holds its maximum of streams")
        return
    session.busy = True
    gate._streams[session.identity] += 1
    try:
        await send({"type": "websocket.accept"})
        sent = _InStep()
        if await _check_opening(scope, receive, send, session, sent, open_timeout_s):
            await _run_app(gate, scope, receive, send, sid, session, sent)
    finally:
        session.busy = False
        gate._streams[session.identity] -= 1
        if not gate._streams[session.identity]:
            del gate._streams[session.identity]
        gate._sessions.pop(sid, None)  # a stream's channel is used once


async def _close(send: Send, code: int, reason: str) -> None:
    await send({"type": "websocket.close", "code": code, "reason": reason})


def _open(session: _Session, data: bytes) -> tuple[bytes, int]:
    """Open a stream message as the request record it stands for; InvalidRecord if it does not."""
    channel = session.channel
    return channel.open_request(_expand(data, FRAME_REQUEST, channel.session_id, channel.expected_request))


async def _check_opening(
    scope: Scope, receive: Receive, send: Send, session: _Session, sent: _InStep, timeout: float
) -> bool:
    try:
        message = await asyncio.wait_for(receive(), timeout)
    except TimeoutError:
        await _close(send, POLICY, "no sealed opening in time")
        return False
    data = message.get("bytes") if message["type"] == "websocket.receive" else None
    if data is None:
        if message["type"] == "websocket.receive":
            await _close(send, UNSUPPORTED, "binary messages only")
        return False
    route = dict(scope["headers"]).get(ROUTE_HEADER.encode(), b"").decode("latin-1")
    try:
        plaintext, sequence = _open(session, data)
    except InvalidRecord:
        logger.warning("aesgcm stream opening rejected")
        await _close(send, POLICY, "invalid_record")
        return False
    if plaintext != _opening(scope["path"], route):
        # the client's own key is in its sealed opening: a proxy rewrote the upgrade's key
        same_path = plaintext.startswith(_opening(scope["path"], ""))
        await _close(
            send, POLICY, ROUTE_MISMATCH if same_path else "the opening does not match the upgrade request"
        )
        return False
    ack = sent.compact(session.channel.seal_response(OPEN_ACK, sequence))
    await send({"type": "websocket.send", "bytes": ack})
    return True


async def _run_app(
    gate: AESGCMMiddleware,
    scope: Scope,
    receive: Receive,
    send: Send,
    sid: bytes,
    session: _Session,
    sent: _InStep,
) -> None:
    waiting: deque[int] = deque()
    connected = False
    gone = {"type": "websocket.disconnect", "code": POLICY}

    async def sealed_receive() -> Message:
        nonlocal connected
        if not connected:
            connected = True
            return {"type": "websocket.connect"}
        message = await receive()
        if message["type"] != "websocket.receive":
            return message
        data = message.get("bytes")
        if data is None:
            await _close(send, UNSUPPORTED, "binary messages only")
            return gone
        if session.revoked or gate._clock() >= session.expires or session.channel.exhausted:
            await _close(send, POLICY, "session revoked, expired or used up; open a new stream")
            return gone
        try:
            plaintext, sequence = _open(session, data)
        except InvalidRecord:
            logger.warning("aesgcm stream record rejected")
            await _close(send, POLICY, "invalid_record")
            return gone
        waiting.append(sequence)
        return {"type": "websocket.receive", "bytes": plaintext}

    refusal: dict[str, Any] = {}

    async def sealed_send(message: Message) -> None:
        kind = message["type"]
        if kind == "websocket.accept":
            return  # accepted before the opening was checked
        if kind.startswith("websocket.http.response"):
            # The app refuses the upgrade, but this layer has accepted it already: close instead,
            # with the refusal's error code as the reason (1013 for a limit: try again later).
            if kind == "websocket.http.response.start":
                refusal["status"] = int(message["status"])
                refusal["body"] = b""
                return
            refusal["body"] = refusal.get("body", b"") + message.get("body", b"")
            if message.get("more_body"):
                return
            status = refusal.get("status", 500)
            try:
                reason = str(json.loads(refusal["body"])["error"]["code"])[:100]
            except (ValueError, KeyError, TypeError):
                reason = f"refused ({status})"
            await _close(send, TRY_AGAIN_LATER if status in (429, 503) else POLICY, reason)
            return
        if kind == "websocket.send":
            if message.get("bytes") is None or not waiting:
                raise RuntimeError("a sealed stream only sends binary answers to requests")
            record = session.channel.seal_response(message["bytes"], waiting.popleft())
            try:
                data = sent.compact(record)
            except ChannelError as exc:
                raise RuntimeError("a sealed stream's records must be sent as they are sealed") from exc
            await send({"type": "websocket.send", "bytes": data})
            return
        await send(message)

    extensions = {
        **(scope.get("extensions") or {}),
        AESGCM_EXTENSION: {"peer_identity": session.identity, "session_id": sid.hex()},
    }
    await gate.app({**scope, "extensions": extensions}, sealed_receive, sealed_send)
