"""TCP reassembly and frame building, on hand-made segments."""

from __future__ import annotations

import random
import struct

from hypothesis import given, settings
from hypothesis import strategies as st

from threat_model._capture._packets import (
    ACK,
    FIN,
    PSH,
    SYN,
    Segment,
    _checksum,
    build_ethernet,
    parse_ethernet,
)
from threat_model._capture._reassembly import reassemble

CLIENT, SERVER = ("127.0.0.1", 50000), ("127.0.0.1", 8443)


def handshake(client_isn: int, server_isn: int) -> list[Segment]:
    return [
        Segment(0.0, CLIENT, SERVER, client_isn, 0, SYN, b""),
        Segment(0.0, SERVER, CLIENT, server_isn, client_isn + 1, SYN | ACK, b""),
    ]


def data(seq: int, payload: bytes, *, src: tuple[str, int] = CLIENT, ts: float = 1.0) -> Segment:
    dst = SERVER if src == CLIENT else CLIENT
    return Segment(ts, src, dst, seq & 0xFFFFFFFF, 0, PSH | ACK, payload)


def cut(message: bytes, rng: random.Random) -> list[tuple[int, bytes]]:
    pieces, pos = [], 0
    while pos < len(message):
        size = rng.randint(1, 40)
        pieces.append((pos, message[pos : pos + size]))
        pos += size
    return pieces


@settings(max_examples=60, deadline=None)
@given(
    message=st.binary(min_size=1, max_size=600),
    isn=st.integers(0, 2**32 - 1),
    seed=st.integers(0, 2**16),
    with_syn=st.booleans(),
)
def test_any_segmentation_order_and_duplication_reassembles(
    message: bytes, isn: int, seed: int, with_syn: bool
) -> None:
    rng = random.Random(seed)
    pieces = cut(message, rng)
    segments = [data(isn + 1 + off, piece) for off, piece in pieces]
    segments += [data(isn + 1 + off, piece) for off, piece in rng.sample(pieces, len(pieces) // 3)]
    # overlapping retransmission that spans two original segments
    if len(message) > 10:
        start = rng.randrange(0, len(message) - 5)
        segments.append(data(isn + 1 + start, message[start : start + 5]))
    rng.shuffle(segments)
    if with_syn:
        segments = handshake(isn, 7) + segments
    else:
        segments.insert(0, data(isn + 1, pieces[0][1]))  # first segment seen first, as a sniffer would
    [stream] = reassemble(segments, {SERVER[1]})
    assert stream.c2s.data == message
    assert stream.c2s.gaps == ()
    assert stream.client == CLIENT and stream.server == SERVER
    assert stream.handshake == with_syn


def test_sequence_numbers_wrap_around() -> None:
    isn = 2**32 - 5
    segments = [*handshake(isn, 100), data(isn + 1, b"abcdefgh"), data(isn + 9, b"ijkl")]
    [stream] = reassemble(segments, {SERVER[1]})
    assert stream.c2s.data == b"abcdefghijkl"


def test_first_captured_copy_wins_on_conflicting_overlap() -> None:
    segments = [*handshake(0, 0), data(1, b"AAAA"), data(3, b"bbbb")]
    [stream] = reassemble(segments, {SERVER[1]})
    assert stream.c2s.data == b"AAAAbb"
    assert stream.c2s.retransmitted_bytes == 2


def test_a_missed_segment_is_reported_as_a_gap() -> None:
    segments = [*handshake(0, 0), data(1, b"head"), data(9, b"tail")]
    [stream] = reassemble(segments, {SERVER[1]})
    assert stream.c2s.gaps == ((4, 8),)
    assert stream.c2s.data == b"head\0\0\0\0tail"
    assert not stream.complete


def test_direction_and_reuse_of_a_four_tuple() -> None:
    first = [*handshake(10, 20), data(11, b"one"), data(21, b"ONE", src=SERVER)]
    first.append(Segment(2.0, CLIENT, SERVER, 14, 24, FIN | ACK, b""))
    second = [*handshake(5000, 9000), data(5001, b"two", ts=3.0)]
    streams = reassemble(first + second, {SERVER[1]})
    assert [(s.c2s.data, s.s2c.data) for s in streams] == [(b"one", b"ONE"), (b"two", b"")]
    assert streams[0].c2s.fin and not streams[1].c2s.fin


def test_other_ports_are_ignored() -> None:
    stray = Segment(0.0, ("127.0.0.1", 1), ("127.0.0.1", 2), 0, 0, PSH, b"x")
    assert reassemble([stray], {SERVER[1]}) == []


@given(payload=st.binary(max_size=300), v6=st.booleans(), seq=st.integers(0, 2**32 - 1))
def test_built_frames_parse_back_with_valid_checksums(payload: bytes, v6: bool, seq: int) -> None:
    host = "::1" if v6 else "127.0.0.1"
    segment = Segment(1.5, (host, 40000), (host, 443), seq, 99, PSH | ACK, payload)
    frame = build_ethernet(segment)
    assert parse_ethernet(frame, 1.5) == segment
    ip = frame[14:]
    if not v6:
        assert _checksum(ip[:20]) == 0
        tcp = ip[20:]
        pseudo = ip[12:20] + struct.pack("!BBH", 0, 6, len(tcp))
    else:
        tcp = ip[40:]
        pseudo = ip[8:40] + struct.pack("!IxxxB", len(tcp), 6)
    assert _checksum(pseudo + tcp) == 0


def test_non_tcp_frames_are_skipped() -> None:
    assert parse_ethernet(b"\x00" * 12 + b"\x08\x06" + b"\x00" * 28, 0.0) is None  # ARP
    assert parse_ethernet(b"short", 0.0) is None
