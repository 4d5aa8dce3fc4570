"""WebSocket connections in a capture, read the way an on-path observer reads them (RFC 6455).

A connection is a WebSocket when the client's bytes open with an HTTP ``GET`` that asks for
``upgrade: websocket`` and the server's with ``HTTP/1.1 101``. After the two HTTP heads each
direction is a sequence of frames::

    byte 0   FIN (1 bit), RSV1-3 (3 bits), opcode (4 bits)
    byte 1   MASK (1 bit), payload length (7 bits: 0-125, or 126 / 127 for a 16 / 64-bit length)
    [2 or 8] extended payload length, big-endian
    [4]      masking key (client -> server frames: always; server -> client: never)
    payload  XOR-ed with the masking key, repeated, when MASK is set

Data messages are a text (1) or binary (2) frame followed, while FIN is clear, by
continuation frames (0); control frames (close 8, ping 9, pong 10) have at most 125 bytes,
are never fragmented and may come between the fragments of a message. The masking key is
sent in the clear next to the payload it masks, so masking hides nothing from an observer:
:func:`read_websocket` unmasks every frame, joins fragments into messages, and reports where
the bytes stop making sense, so a caller can scan what an attacker would read and refuse
what it cannot explain.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from threat_model._capture._reassembly import DirectionName, TcpStream

__all__ = [
    "CONTROL",
    "OPCODES",
    "WsDirection",
    "WsFrame",
    "WsMessage",
    "WsView",
    "is_websocket",
    "parse_frames",
    "read_websocket",
]

CONT, TEXT, BINARY, CLOSE, PING, PONG = 0, 1, 2, 8, 9, 10
OPCODES = {CONT: "continuation", TEXT: "text", BINARY: "binary", CLOSE: "close", PING: "ping", PONG: "pong"}
CONTROL = (CLOSE, PING, PONG)
_UPGRADE = re.compile(rb"\r\nupgrade:[ \t]*websocket[ \t]*\r\n", re.IGNORECASE)


@dataclass(frozen=True)
class WsFrame:
    """One frame: where it starts in its direction's bytes, its header, and its unmasked payload."""

    offset: int
    header_size: int  # 2-14 bytes, masking key included
    fin: bool
    rsv: int  # the three reserved bits; no extension is negotiated, so always 0 when honest
    opcode: int
    mask: bytes | None
    payload: bytes  # unmasked
    minimal: bool  # the length uses its shortest encoding (RFC 6455 5.2 requires it)

    @property
    def size(self) -> int:
        return self.header_size + len(self.payload)

    @property
    def payload_offset(self) -> int:
        return self.offset + self.header_size


@dataclass(frozen=True)
class WsMessage:
    """A data message (fragments joined) or one control frame, unmasked."""

    opcode: int  # of its first frame
    data: bytes
    offset: int  # of its first frame
    size: int  # bytes on the wire, every frame's header included
    frames: tuple[WsFrame, ...]

    @property
    def kind(self) -> str:
        return OPCODES.get(self.opcode, f"opcode {self.opcode}")


@dataclass
class WsDirection:
    """One direction of a WebSocket connection: its HTTP head, frames, messages, and what did not parse."""

    head_end: int  # bytes [0, head_end) are the HTTP upgrade request or response
    frames: list[WsFrame] = field(default_factory=list)
    messages: list[WsMessage] = field(default_factory=list)
    problems: list[tuple[int, str]] = field(default_factory=list)
    unparsed: int = -1  # offset from which nothing parsed (-1: every byte did)

    def spans(self, data: bytes) -> list[tuple[int, bytes]]:
        """What an observer reads, as (wire offset, bytes): the head, each message unmasked with its
        fragments joined (at its first payload byte), and the raw bytes from the first place the
        framing stopped making sense."""
        out = [(0, data[: self.head_end])]
        out += [(m.frames[0].payload_offset, m.data) for m in self.messages if m.data]
        if self.unparsed >= 0:
            out.append((self.unparsed, data[self.unparsed :]))
        return out


@dataclass(frozen=True)
class WsView:
    c2s: WsDirection
    s2c: WsDirection

    def direction(self, name: DirectionName) -> WsDirection:
        return self.c2s if name == "c2s" else self.s2c


def is_websocket(stream: TcpStream) -> bool:
    """The client asked for a WebSocket upgrade and the server switched protocols."""
    head = stream.c2s.data[: stream.c2s.data.find(b"\r\n\r\n") + 2]
    return (
        stream.c2s.data.startswith(b"GET ")
        and _UPGRADE.search(head) is not None
        and stream.s2c.data.startswith(b"HTTP/1.1 101 ")
    )


def _unmask(payload: bytes, key: bytes) -> bytes:
    if not payload:
        return payload
    repeated = (key * (len(payload) // 4 + 1))[: len(payload)]
    return (int.from_bytes(payload, "big") ^ int.from_bytes(repeated, "big")).to_bytes(len(payload), "big")


def _frame(data: bytes, pos: int) -> WsFrame | str:
    if pos + 2 > len(data):
        return "truncated WebSocket frame header"
    first, second = data[pos], data[pos + 1]
    length, cursor, minimal = second & 0x7F, pos + 2, True
    if length >= 126:
        size = 2 if length == 126 else 8
        if cursor + size > len(data):
            return "truncated WebSocket frame length"
        length = int.from_bytes(data[cursor : cursor + size], "big")
        minimal = length > (125 if size == 2 else 0xFFFF)
        cursor += size
        if length >> 63:
            return "WebSocket frame length with the top bit set"
    mask = None
    if second & 0x80:
        if cursor + 4 > len(data):
            return "truncated WebSocket masking key"
        mask = data[cursor : cursor + 4]
        cursor += 4
    if cursor + length > len(data):
        return "WebSocket frame runs past the end of the stream"
    payload = data[cursor : cursor + length]
    return WsFrame(pos, cursor - pos, bool(first & 0x80), (first >> 4) & 7, first & 0x0F, mask,
                   _unmask(payload, mask) if mask else payload, minimal)  # fmt: skip


def parse_frames(data: bytes, start: int, *, client: bool) -> WsDirection:
    """Frames and messages of one direction from ``start`` (the end of its HTTP head).

    Every deviation from RFC 6455 as a client (``client=True``) or server would send it is a
    problem: a frame (un)masked the wrong way, reserved bits, an unknown opcode, a long or
    fragmented control frame, a continuation out of place, a non-minimal length. Parsing stops
    at the first frame that cannot be delimited; from there the bytes are ``unparsed``.
    """
    out = WsDirection(start)
    pos = start
    pending: list[WsFrame] = []
    while pos < len(data):
        frame = _frame(data, pos)
        if isinstance(frame, str):
            out.problems.append((pos, frame))
            out.unparsed = pos
            break
        out.frames.append(frame)
        bad = None
        if (frame.mask is not None) != client:
            bad = "unmasked client frame" if client else "masked server frame"
        elif frame.rsv:
            bad = "reserved bits set (no extension was negotiated)"
        elif frame.opcode not in OPCODES:
            bad = f"unknown opcode {frame.opcode}"
        elif frame.opcode in CONTROL and (len(frame.payload) > 125 or not frame.fin):
            bad = "control frame longer than 125 bytes or fragmented"
        elif not frame.minimal:
            bad = "payload length not in its shortest encoding"
        elif frame.opcode == CONT and not pending:
            bad = "continuation frame without a message to continue"
        elif frame.opcode in (TEXT, BINARY) and pending:
            bad = "new data message inside a fragmented one"
        if bad is not None:
            out.problems.append((pos, bad))
        if frame.opcode in CONTROL or frame.opcode not in OPCODES:
            out.messages.append(WsMessage(frame.opcode, frame.payload, pos, frame.size, (frame,)))
        elif frame.opcode != CONT or pending:
            pending.append(frame)
            if frame.fin:
                out.messages.append(_joined(pending))
                pending = []
        else:  # a stray continuation: its bytes are still read
            out.messages.append(WsMessage(CONT, frame.payload, pos, frame.size, (frame,)))
        pos += frame.size
    if pending:
        out.problems.append((pending[0].offset, "fragmented message never finished"))
        out.messages.append(_joined(pending))
    return out


def _joined(frames: list[WsFrame]) -> WsMessage:
    data = b"".join(f.payload for f in frames)
    return WsMessage(frames[0].opcode, data, frames[0].offset, sum(f.size for f in frames), tuple(frames))


def read_websocket(stream: TcpStream) -> WsView | None:
    """Both directions of a WebSocket connection, or None if ``stream`` is not one."""
    if not is_websocket(stream):
        return None
    c2s, s2c = stream.c2s.data, stream.s2c.data
    return WsView(
        parse_frames(c2s, c2s.find(b"\r\n\r\n") + 4, client=True),
        parse_frames(s2c, s2c.find(b"\r\n\r\n") + 4, client=False),
    )
