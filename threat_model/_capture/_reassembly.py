"""TCP stream reassembly: per connection and direction, bytes in sequence order.

Retransmitted and overlapping segments are placed by sequence number; where two
segments disagree about the same byte, the first one captured wins (what a passive
observer saw first). Holes (segments the capture missed) are zero-filled in ``data``
and listed in ``gaps`` so a caller can refuse an incomplete capture.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Literal

import numpy as np

from threat_model._capture._packets import ACK, Endpoint, Segment

DirectionName = Literal["c2s", "s2c"]
_MOD = 1 << 32


@dataclass(frozen=True)
class Chunk:
    """A piece of payload as it arrived: capture time, offset in the stream, length."""

    ts: float
    offset: int
    length: int


@dataclass(frozen=True)
class Direction:
    """One direction of a connection: the reassembled bytes and how they arrived."""

    data: bytes
    chunks: tuple[Chunk, ...]
    gaps: tuple[tuple[int, int], ...]
    retransmitted_bytes: int = 0
    fin: bool = False
    rst: bool = False
    closed_at: float | None = None  # capture time of the first FIN or RST in this direction


@dataclass(frozen=True)
class TcpStream:
    """A reassembled TCP connection; ``c2s`` is client to server, ``s2c`` the reverse."""

    client: Endpoint
    server: Endpoint
    c2s: Direction
    s2c: Direction
    start: float
    end: float
    handshake: bool

    def direction(self, name: DirectionName) -> Direction:
        return self.c2s if name == "c2s" else self.s2c

    @property
    def complete(self) -> bool:
        """True when the handshake was seen and neither direction has a hole."""
        return self.handshake and not self.c2s.gaps and not self.s2c.gaps


@dataclass
class _Conn:
    segments: list[Segment] = field(default_factory=list)
    client_isn: int | None = None


def _is_pure_syn(segment: Segment) -> bool:
    return segment.syn and not segment.flags & ACK


def reassemble(segments: Iterable[Segment], server_ports: set[int]) -> list[TcpStream]:
    """Group segments into connections touching ``server_ports`` and reassemble both directions."""
    wanted = [s for s in segments if s.src[1] in server_ports or s.dst[1] in server_ports]
    streams = [_build(conn, server_ports) for conn in _connections(wanted)]
    return sorted(streams, key=lambda stream: stream.start)


def reassemble_clients(segments: Iterable[Segment], clients: set[Endpoint]) -> list[TcpStream]:
    """Connections with one end in ``clients`` (the client's own local endpoints), oriented from it."""
    wanted = [s for s in segments if s.src in clients or s.dst in clients]
    streams = []
    for conn in _connections(wanted):
        first = conn.segments[0]
        client = first.src if first.src in clients else first.dst
        server = first.dst if client == first.src else first.src
        streams.append(_build(conn, set(), (client, server)))
    return sorted(streams, key=lambda stream: stream.start)


def _connections(segments: Iterable[Segment]) -> list[_Conn]:
    current: dict[frozenset[Endpoint], _Conn] = {}
    finished: list[_Conn] = []
    for segment in segments:
        key = frozenset((segment.src, segment.dst))
        conn = current.get(key)
        if _is_pure_syn(segment) and conn is not None and conn.client_isn not in (None, segment.seq):
            finished.append(conn)
            conn = None
        if conn is None:
            conn = current[key] = _Conn()
        if _is_pure_syn(segment):
            conn.client_isn = segment.seq
        conn.segments.append(segment)
    finished.extend(current.values())
    return finished


def _build(conn: _Conn, server_ports: set[int], ends: tuple[Endpoint, Endpoint] | None = None) -> TcpStream:
    first = conn.segments[0]
    syn = next((s for s in conn.segments if _is_pure_syn(s)), None)
    if ends is not None:
        client, server = ends
    elif syn is not None:
        client, server = syn.src, syn.dst
    elif first.dst[1] in server_ports:
        client, server = first.src, first.dst
    else:
        client, server = first.dst, first.src
    handshake = (
        syn is not None
        and syn.src == client
        and any(s.syn and s.flags & ACK and s.src == server for s in conn.segments)
    )
    c2s = _direction([s for s in conn.segments if s.src == client])
    s2c = _direction([s for s in conn.segments if s.src == server])
    times = [s.ts for s in conn.segments]
    return TcpStream(client, server, c2s, s2c, min(times), max(times), handshake)


def _direction(segments: list[Segment]) -> Direction:
    syn = next((s for s in segments if s.syn), None)
    carrying = [s for s in segments if s.payload]
    fin = any(s.fin for s in segments)
    rst = any(s.rst for s in segments)
    closed_at = min((s.ts for s in segments if s.fin or s.rst), default=None)
    if syn is not None:
        base = (syn.seq + 1) % _MOD
    elif carrying:
        anchor = carrying[0].seq
        base = (anchor + min(_signed(s.seq - anchor) for s in carrying)) % _MOD
    else:
        return Direction(b"", (), (), 0, fin, rst, closed_at)
    placed = [((s.seq - base) % _MOD, s) for s in carrying]
    end = max((offset + len(s.payload) for offset, s in placed), default=0)
    buffer = np.zeros(end, dtype=np.uint8)
    covered = np.zeros(end, dtype=bool)
    chunks: list[Chunk] = []
    retransmitted = 0
    for offset, segment in placed:
        payload = np.frombuffer(segment.payload, dtype=np.uint8)
        stop = offset + len(payload)
        window = covered[offset:stop]
        fresh = ~window
        seen = int(window.sum())
        retransmitted += seen
        if seen == 0:
            buffer[offset:stop] = payload
        elif seen < len(payload):
            buffer[offset:stop][fresh] = payload[fresh]
        if seen < len(payload):
            chunks.append(Chunk(segment.ts, offset, len(payload)))
        covered[offset:stop] = True
    return Direction(buffer.tobytes(), tuple(chunks), _holes(covered), retransmitted, fin, rst, closed_at)


def _signed(delta: int) -> int:
    delta %= _MOD
    return delta - _MOD if delta >= _MOD // 2 else delta


def _holes(covered: np.ndarray) -> tuple[tuple[int, int], ...]:
    if covered.all():
        return ()
    edges = np.diff(np.concatenate(([1], covered.astype(np.int8), [1])))
    starts = np.flatnonzero(edges == -1)
    stops = np.flatnonzero(edges == 1)
    return tuple((int(a), int(b)) for a, b in zip(starts, stops, strict=True))
