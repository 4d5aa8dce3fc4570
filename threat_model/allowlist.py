"""The first line of the suite: in an encrypted mode, every byte on the wire must have an allowed shape.

Detectors look for known encodings of known secrets; an encoding nobody thought of slips
past them. The allowlist inverts that: it parses each direction of each connection and
reports anything that is not one of the few shapes the protocol can produce.

``tls``, ``tls+aesgcm``
    Every byte parses as TLS records; each direction starts with one plaintext hello
    (ClientHello / a TLS 1.3 ServerHello), may send one ChangeCipherSpec, and then only
    encrypted ``application_data`` records (content type 23) follow.
``aesgcm``
    Every HTTP/1.1 message parses; request lines, header names and header values belong
    to a fixed set of shapes derived from the sealed-channel protocol's constants; each
    body is a well-formed handshake message or sealed record whose length matches its
    header. Across sessions no two sealed records may share keystream (fresh keys).

    A WebSocket connection (the stream) is judged by :mod:`threat_model._stream_allowlist`:
    the upgrade's headers, the RFC 6455 framing, and one sealed record per binary message.

Each violation carries the stream, direction, offset and a short hex excerpt. A new wire
surface adds a route to :data:`_REQUEST_BODIES` or a parser of its own; everything not
listed stays a violation.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from secure_channel._handshake import (
    HS_VERSION,
    MAX_MESSAGE,
    MSG1,
    MSG1_SIZE,
    MSG2,
    MSG2_HEADER_SIZE,
    MSG3,
    MSG3_HEADER_SIZE,
    MSG4,
    MSG4_SIZE,
)
from secure_channel._records import (
    FRAME_REQUEST,
    FRAME_RESPONSE,
    HEADER,
    OVERHEAD,
    RECORD_VERSION,
    SESSION_ID_SIZE,
    TAG_SIZE,
)
from secure_channel._wire import (
    CONTENT_TYPE,
    HANDSHAKE_PATH,
    HEALTH_PATH,
    ROUTE_HEADER,
    SECURE_PATH,
    SESSION_HEADER,
)
from threat_model._capture._reassembly import DirectionName, TcpStream

__all__ = [
    "CHECKS",
    "Violation",
    "allowlist_checks",
    "keystream_reuse",
    "sealed_http_violations",
    "tls_violations",
]

CHECKS = {
    "tls": "wire allowlist: only TLS 1.3 records, encrypted after the hello",
    "aesgcm": "wire allowlist: only the sealed-channel HTTP and stream surface",
    "keys": "aesgcm: fresh keys (no keystream shared between sessions)",
}
TLS_MAX_CIPHERTEXT = 2**14 + 256
_HANDSHAKE, _CCS, _APPLICATION_DATA = 22, 20, 23
_EXCERPT = 16


@dataclass(frozen=True)
class Violation:
    stream: str
    direction: DirectionName
    offset: int
    reason: str
    excerpt: str  # hex of at most 16 bytes at ``offset``

    def __str__(self) -> str:
        return f"{self.stream} {self.direction} @{self.offset}: {self.reason} [{self.excerpt}]"


def _violation(label: str, name: DirectionName, data: bytes, offset: int, reason: str) -> Violation:
    return Violation(label, name, offset, reason, data[offset : offset + _EXCERPT].hex())


def _label(stream: TcpStream) -> str:
    return f"{stream.client[0]}:{stream.client[1]}->{stream.server[0]}:{stream.server[1]}"


# --- TLS -------------------------------------------------------------------------------


def _is_tls13_server_hello(body: bytes) -> bool:
    """A ServerHello whose supported_versions extension selects TLS 1.3 (0x0304)."""
    try:
        if body[0] != 2:
            return False
        pos = 4 + 2 + 32  # handshake header, legacy_version, random
        pos += 1 + body[pos]  # legacy_session_id_echo
        pos += 2 + 1  # cipher suite, compression
        end = pos + 2 + int.from_bytes(body[pos : pos + 2], "big")
        pos += 2
        while pos + 4 <= end:
            kind, size = (
                int.from_bytes(body[pos : pos + 2], "big"),
                int.from_bytes(body[pos + 2 : pos + 4], "big"),
            )
            if kind == 43:  # supported_versions
                return body[pos + 4 : pos + 4 + size] == b"\x03\x04"
            pos += 4 + size
    except IndexError:
        return False
    return False


def tls_violations(stream: TcpStream) -> list[Violation]:
    """Everything in ``stream`` that is not a TLS 1.3 hello, one ChangeCipherSpec, or application data."""
    out: list[Violation] = []
    label = _label(stream)
    for name in ("c2s", "s2c"):
        data = stream.direction(name).data
        pos, phase = 0, "hello"
        while pos < len(data):

            def bad(reason: str, at: int = pos, data: bytes = data, name: DirectionName = name) -> Violation:
                return _violation(label, name, data, at, reason)

            if pos + 5 > len(data):
                out.append(bad("truncated TLS record header"))
                break
            kind, major, minor = data[pos], data[pos + 1], data[pos + 2]
            length = int.from_bytes(data[pos + 3 : pos + 5], "big")
            body = data[pos + 5 : pos + 5 + length]
            if major != 3 or minor not in (1, 3) or length > TLS_MAX_CIPHERTEXT:
                out.append(
                    bad(f"not a TLS record header (type {kind}, version {major}.{minor}, length {length})")
                )
                break
            if len(body) < length:
                out.append(bad("TLS record runs past the end of the stream"))
                break
            if phase == "hello":
                hello = body[:1] == (b"\x01" if name == "c2s" else b"\x02")
                if kind != _HANDSHAKE or not hello or (name == "s2c" and not _is_tls13_server_hello(body)):
                    out.append(bad(f"expected a TLS 1.3 {'Client' if name == 'c2s' else 'Server'}Hello"))
                    break
                phase = "ccs"
            elif (kind == _CCS and phase == "ccs" and body == b"\x01") or (
                kind == _APPLICATION_DATA and length >= 17
            ):
                phase = "encrypted"
            else:
                out.append(bad(f"TLS record of content type {kind} ({length} bytes) after the hello"))
            pos += 5 + length
    return out


# --- the sealed-channel HTTP surface ------------------------------------------------------------


@dataclass(frozen=True)
class _Message:
    start: str
    headers: dict[str, str]  # the first value of each header
    fields: list[tuple[str, str]]  # every header line, repeats included
    body: bytes
    offset: int


_HOST = re.compile(r"(?:127\.0\.0\.1|localhost|\[::1\]):\d{1,5}")
_DIGITS = re.compile(r"0|[1-9]\d{0,9}")
_DATE = re.compile(
    r"(?:Mon|Tue|Wed|Thu|Fri|Sat|Sun), \d\d (?:Jan|Feb|Mar|Apr|May|Jun|Jul|Aug|Sep|Oct|Nov|Dec) \d{4} \d\d:\d\d:\d\d GMT"
)
_SESSION = re.compile(f"[0-9a-f]{{{2 * SESSION_ID_SIZE}}}")
_ROUTE = re.compile("[0-9a-f]{32}")
_REQUEST_HEADERS: dict[str, re.Pattern[str]] = {
    "host": _HOST,
    "content-length": _DIGITS,
    "content-type": re.compile(re.escape(CONTENT_TYPE)),
    SESSION_HEADER: _SESSION,
    ROUTE_HEADER: _ROUTE,  # random per channel, for a proxy to hash on; bound into the handshake
}
_RESPONSE_HEADERS: dict[str, re.Pattern[str]] = {
    "date": _DATE,
    "server": re.compile("uvicorn"),
    "cache-control": re.compile("no-store"),
    "x-content-type-options": re.compile("nosniff"),
    "content-length": _DIGITS,
    "content-type": re.compile(re.escape(CONTENT_TYPE) + "|application/json"),
    ROUTE_HEADER: _ROUTE,  # handshake replies echo the key the server saw
}
_REQUEST_LINES = {
    f"POST {HANDSHAKE_PATH} HTTP/1.1": HANDSHAKE_PATH,
    f"POST {SECURE_PATH} HTTP/1.1": SECURE_PATH,
    f"GET {HEALTH_PATH} HTTP/1.1": HEALTH_PATH,
}


def _parse(data: bytes, pos: int) -> _Message | str:
    end = data.find(b"\r\n\r\n", pos)
    if end < 0:
        return "no complete HTTP head"
    try:
        head = data[pos:end].decode("ascii")
    except UnicodeDecodeError:
        return "non-ASCII bytes in an HTTP head"
    start, *lines = head.split("\r\n")
    fields: list[tuple[str, str]] = []
    for line in lines:
        name, colon, value = line.partition(":")
        if not colon or not name or name != name.strip():
            return f"malformed header line {line[:40]!r}"
        fields.append((name.lower(), value.strip()))
    headers: dict[str, str] = {}
    for name, value in fields:
        if headers.setdefault(name, value) != value:
            return f"header {name!r} repeated with a different value"
    length = headers.get("content-length", "0")
    if not _DIGITS.fullmatch(length):
        return "content-length is not a number"
    body = data[end + 4 : end + 4 + int(length)]
    if len(body) < int(length):
        return "body shorter than its content-length"
    return _Message(start, headers, fields, body, pos)


def _check_headers(message: _Message, allowed: dict[str, re.Pattern[str]]) -> str | None:
    for name, value in message.fields:
        shape = allowed.get(name)
        if shape is None:
            return f"header {name!r} is not in the allowlist"
        if not shape.fullmatch(value):
            return f"header {name!r} has a value outside its allowed shape"
    return None


def _record(body: bytes, frame_type: int, session: str | None) -> str | None:
    if len(body) < OVERHEAD:
        return f"sealed record of {len(body)} bytes is shorter than its {OVERHEAD}-byte overhead"
    version, kind, sid, _, _ = HEADER.unpack_from(body)
    if version != RECORD_VERSION or kind != frame_type:
        return f"sealed record header version {version} type {kind}"
    if session is not None and sid.hex() != session:
        return "sealed record session id differs from the session header"
    return None


def _handshake_body(body: bytes, expected: tuple[int, ...]) -> str | None:
    if len(body) < 2 or body[0] != HS_VERSION or body[1] not in expected:
        return "not a handshake message"
    sizes = {MSG1: (MSG1_SIZE, MSG1_SIZE), MSG4: (MSG4_SIZE, MSG4_SIZE),
             MSG2: (MSG2_HEADER_SIZE + TAG_SIZE, MAX_MESSAGE), MSG3: (MSG3_HEADER_SIZE + TAG_SIZE, MAX_MESSAGE)}  # fmt: skip
    low, high = sizes[body[1]]
    return None if low <= len(body) <= high else f"handshake message {body[1]} of {len(body)} bytes"


_REQUEST_BODIES: dict[str, Callable[[_Message], str | None]] = {
    HANDSHAKE_PATH: lambda m: _handshake_body(m.body, (MSG1, MSG3)),
    SECURE_PATH: lambda m: _record(m.body, FRAME_REQUEST, m.headers.get(SESSION_HEADER)),
    HEALTH_PATH: lambda m: "a health check carries no body" if m.body else None,
}


def _response_body(path: str, request: _Message, response: _Message) -> str | None:
    if path == HANDSHAKE_PATH:
        return _handshake_body(response.body, (MSG2, MSG4))
    if path == SECURE_PATH:
        return _record(response.body, FRAME_RESPONSE, request.headers.get(SESSION_HEADER))
    return None if response.body == b'{"status":"ok"}' else "unexpected health check body"


def sealed_http_violations(
    stream: TcpStream, records: list[tuple[int, bytes]] | None = None
) -> list[Violation]:
    """Everything in ``stream`` outside the sealed channel's HTTP surface; sealed records go to ``records``."""
    label = _label(stream)
    out: list[Violation] = []
    paths: list[tuple[str, _Message]] = []
    data, pos = stream.c2s.data, 0
    while pos < len(data):
        message = _parse(data, pos)
        if isinstance(message, str):
            out.append(_violation(label, "c2s", data, pos, message))
            break
        path = _REQUEST_LINES.get(message.start)
        problem = (
            "request line outside the allowlist"
            if path is None
            else _check_headers(message, _REQUEST_HEADERS)
        )
        problem = problem or _REQUEST_BODIES[path or SECURE_PATH](message)
        if problem:
            out.append(_violation(label, "c2s", data, pos, problem))
        elif path == SECURE_PATH and records is not None:
            records.append((FRAME_REQUEST, message.body))
        paths.append((path or "", message))
        pos = data.index(b"\r\n\r\n", pos) + 4 + len(message.body)
    data, pos, index = stream.s2c.data, 0, 0
    while pos < len(data):
        message = _parse(data, pos)
        if isinstance(message, str):
            out.append(_violation(label, "s2c", data, pos, message))
            break
        problem = None if message.start == "HTTP/1.1 200 OK" else "status line outside the allowlist"
        problem = problem or _check_headers(message, _RESPONSE_HEADERS)
        if problem is None and index >= len(paths):
            problem = "a response without a request"
        if problem is None:
            problem = _response_body(paths[index][0], paths[index][1], message)
        if problem:
            out.append(_violation(label, "s2c", data, pos, problem))
        elif paths[index][0] == SECURE_PATH and records is not None:
            records.append((FRAME_RESPONSE, message.body))
        index += 1
        pos = data.index(b"\r\n\r\n", pos) + 4 + len(message.body)
    return out


def keystream_reuse(records: Sequence[tuple[int, bytes]], *, run: int = 16) -> list[str]:
    """Pairs of sealed records of different sessions at the same (type, epoch, sequence) whose
    ciphertexts agree on ``run`` consecutive bytes: the same key and nonce encrypted both."""
    groups: dict[tuple[int, int, int], list[tuple[bytes, bytes]]] = {}
    for kind, body in records:
        _, _, sid, epoch, sequence = HEADER.unpack_from(body)
        groups.setdefault((kind, epoch, sequence), []).append((sid, body[HEADER.size :]))
    found = []
    for (kind, epoch, sequence), items in sorted(groups.items()):
        for i, (sid_a, a) in enumerate(items):
            for sid_b, b in items[i + 1 :]:
                n = min(len(a), len(b))
                if sid_a == sid_b or n < run:
                    continue
                same = np.frombuffer(a[:n], np.uint8) == np.frombuffer(b[:n], np.uint8)
                longest = np.diff(np.flatnonzero(np.concatenate(([True], ~same, [True])))).max() - 1
                if longest >= run:
                    found.append(
                        f"sessions {sid_a.hex()[:8]}… and {sid_b.hex()[:8]}…: {'request' if kind == FRAME_REQUEST else 'response'} "
                        f"records at epoch {epoch} sequence {sequence} share {longest} ciphertext bytes"
                    )
    return found


def allowlist_checks(mode: str, sessions: Sequence[Sequence[TcpStream]]) -> list[dict[str, Any]]:
    """The allowlist verdicts of one encrypted mode over the client's captured connections."""

    def verdict(key: str, problems: Sequence[Any], total: int) -> dict[str, Any]:
        detail = "; ".join(str(p) for p in problems[:3]) if problems else f"{total} connections conform"
        return {"check": CHECKS[key], "passed": not problems, "detail": detail, "violations": len(problems)}

    streams = [stream for found in sessions for stream in found]
    if mode in ("tls", "tls+aesgcm"):
        return [verdict("tls", [v for s in streams for v in tls_violations(s)], len(streams))]
    if mode != "aesgcm":
        raise ValueError(f"no allowlist for mode {mode!r}")
    from threat_model._stream_allowlist import websocket_violations
    from threat_model._websocket import is_websocket

    records: list[tuple[int, bytes]] = []
    violations = [
        v
        for s in streams
        for v in (websocket_violations if is_websocket(s) else sealed_http_violations)(s, records)
    ]
    return [
        verdict("aesgcm", violations, len(streams)),
        verdict("keys", keystream_reuse(records), len(records)),
    ]
