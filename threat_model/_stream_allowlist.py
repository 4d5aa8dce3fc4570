"""The allowlist of a sealed stream (``aesgcm``): every byte of a WebSocket connection has a known shape.

Client to server: one HTTP upgrade request, ``GET /v1/stream``, whose header names and values
belong to fixed shapes and all must be there (host, the four WebSocket headers, a
32-hex-digit routing key and channel session id; nothing else, not even a user agent); then only masked frames: binary messages
that are each one sealed *request* record in the stream's compact form (``epoch_low ||
ciphertext || tag``, :mod:`secure_channel._sealed_stream`), and a close with code 1000 or 1001
and no reason.

Server to client: ``HTTP/1.1 101 Switching Protocols`` whose ``sec-websocket-accept`` is
exactly the one RFC 6455 derives from the client's key, then only unmasked frames: binary
messages that are each one sealed *response* record, and a close with a known code and a
short ASCII reason (an unauthenticated hint, see SECURITY.md).

No text frame, no ping or pong (the server sends no pings, the client none either; a ping's
payload is free bytes), no extension (reserved bits), no fragment left open, no byte after the
framing stops parsing. A record's only clear byte is its epoch's low byte, and an observer can
track the epoch as the receiver does: it starts at 0 (each stream has a fresh channel session),
and each record of a direction keeps it or moves it on by one (a rekey); any other byte there is
not a sealed record. Frame type and sequence are implied by direction and order, so records go
to the caller as full records (the upgrade's session id, the tracked epoch and the sequence put
back) for the fresh-keys check.
"""

from __future__ import annotations

import base64
import hashlib
import re

from lambda_split.protocol import ROUTE_HEADER, STREAM_PATH
from secure_channel._records import FRAME_REQUEST, FRAME_RESPONSE, HEADER, RECORD_VERSION, SESSION_ID_SIZE
from secure_channel._sealed_stream import COMPACT_HEADER, STREAM_OVERHEAD
from secure_channel._wire import SESSION_HEADER
from threat_model._capture._reassembly import DirectionName, TcpStream
from threat_model._websocket import BINARY, CLOSE, WsDirection, WsMessage, read_websocket
from threat_model.allowlist import _DATE, _HOST, Violation, _check_headers, _label, _parse, _violation

__all__ = ["websocket_violations"]

_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"  # RFC 6455, section 1.3
_HEX = re.compile(f"[0-9a-f]{{{2 * SESSION_ID_SIZE}}}")
_UPGRADE_HEADERS: dict[str, re.Pattern[str]] = {
    "host": _HOST,
    "upgrade": re.compile("websocket"),
    "connection": re.compile("Upgrade"),
    "sec-websocket-key": re.compile(r"[A-Za-z0-9+/]{22}=="),
    "sec-websocket-version": re.compile("13"),
    ROUTE_HEADER: _HEX,
    SESSION_HEADER: _HEX,
}
_SWITCH_HEADERS: dict[str, re.Pattern[str]] = {
    "upgrade": re.compile("websocket"),
    "connection": re.compile("Upgrade"),
    "sec-websocket-accept": re.compile(r"[A-Za-z0-9+/]{27}="),
    "date": _DATE,
    "server": re.compile("uvicorn"),
}
REQUEST_LINE = f"GET {STREAM_PATH} HTTP/1.1"
SWITCH_LINE = "HTTP/1.1 101 Switching Protocols"
CLIENT_CLOSE_CODES = (1000, 1001)
SERVER_CLOSE_CODES = (1000, 1001, 1003, 1008, 1009, 1011, 1013)
_REASON = re.compile(rb"[ -~]{0,123}")


def accept_key(key: str) -> str:
    """The ``sec-websocket-accept`` a server must answer to ``key`` (RFC 6455, section 4.2.2)."""
    return base64.b64encode(hashlib.sha1(key.encode() + _GUID).digest()).decode()


def _record(message: WsMessage, frame_type: int, epoch: int) -> str | None:
    """Why ``message`` is not the next sealed record of its direction, whose epoch was ``epoch``."""
    data = message.data
    if len(data) < STREAM_OVERHEAD:
        return f"stream message of {len(data)} bytes is shorter than a sealed record"
    if data[0] not in (epoch & 0xFF, (epoch + 1) & 0xFF):
        kind = "request" if frame_type == FRAME_REQUEST else "response"
        return f"stream message is not a sealed {kind} record (epoch byte {data[0]}, the stream's epoch is {epoch})"
    return None


def _close(message: WsMessage, codes: tuple[int, ...], reason: bool) -> str | None:
    data = message.data
    if len(data) == 1 or (data and int.from_bytes(data[:2], "big") not in codes):
        return "close frame with a code outside the allowlist"
    if len(data) > 2 and (not reason or not _REASON.fullmatch(data[2:])):
        return "close frame with a reason outside its allowed shape"
    return None


def _frames(
    label: str, name: DirectionName, data: bytes, frames: WsDirection
) -> tuple[list[Violation], list[tuple[int, bytes]]]:
    """Violations of one direction's frames, and its sealed records as ``(epoch, compact form)``
    (their sequences are their positions)."""
    out = [_violation(label, name, data, at, problem) for at, problem in frames.problems]
    records: list[tuple[int, bytes]] = []
    client = name == "c2s"
    epoch = 0
    for message in frames.messages:
        problem: str | None
        if message.opcode == BINARY:
            problem = _record(message, FRAME_REQUEST if client else FRAME_RESPONSE, epoch)
            if problem is None:
                if message.data[0] != epoch & 0xFF:
                    epoch += 1  # the sender rekeyed
                records.append((epoch, message.data))
        elif message.opcode == CLOSE:
            problem = _close(message, CLIENT_CLOSE_CODES if client else SERVER_CLOSE_CODES, not client)
        else:
            problem = f"{message.kind} message {'to' if client else 'from'} the server"
        if problem:
            out.append(_violation(label, name, data, message.offset, problem))
    return out, records


def websocket_violations(
    stream: TcpStream, records: list[tuple[int, bytes]] | None = None
) -> list[Violation]:
    """Everything in the WebSocket connection ``stream`` outside the sealed stream's surface."""
    label = _label(stream)
    view = read_websocket(stream)
    if view is None:
        return [_violation(label, "c2s", stream.c2s.data, 0, "not a WebSocket connection")]
    c2s, s2c = stream.c2s.data, stream.s2c.data
    out: list[Violation] = []
    request, response = _parse(c2s, 0), _parse(s2c, 0)
    session = None
    problem: str | None
    if isinstance(request, str) or request.start != REQUEST_LINE:
        problem = request if isinstance(request, str) else "upgrade request line outside the allowlist"
        out.append(_violation(label, "c2s", c2s, 0, problem))
    else:
        problem = _check_headers(request, _UPGRADE_HEADERS)
        missing = sorted(set(_UPGRADE_HEADERS) - set(request.headers))
        if problem or missing or request.body:
            out.append(_violation(label, "c2s", c2s, 0, problem or f"upgrade request without {missing}"))
        session = request.headers.get(SESSION_HEADER)
    if isinstance(response, str) or response.start != SWITCH_LINE:
        problem = response if isinstance(response, str) else "upgrade response status outside the allowlist"
        out.append(_violation(label, "s2c", s2c, 0, problem))
    else:
        problem = _check_headers(response, _SWITCH_HEADERS)
        key = "" if isinstance(request, str) else request.headers.get("sec-websocket-key", "")
        if problem is None and response.headers.get("sec-websocket-accept") != accept_key(key):
            problem = "sec-websocket-accept does not answer the client's key"
        if problem or response.body:
            out.append(_violation(label, "s2c", s2c, 0, problem or "a body after the upgrade response"))
    found_c2s, sent = _frames(label, "c2s", c2s, view.c2s)
    found_s2c, answered = _frames(label, "s2c", s2c, view.s2c)
    out += found_c2s + found_s2c
    if len(answered) > len(sent):
        out.append(_violation(label, "s2c", s2c, view.s2c.head_end, "more sealed responses than requests"))
    if records is not None and session is not None:
        sid = bytes.fromhex(session)
        for kind, found in ((FRAME_REQUEST, sent), (FRAME_RESPONSE, answered)):
            for sequence, (epoch, compact) in enumerate(found):
                header = HEADER.pack(RECORD_VERSION, kind, sid, epoch, sequence)
                records.append((kind, header + compact[COMPACT_HEADER:]))
    return out
