"""The suite reads WebSocket connections as an on-path observer does (RFC 6455), and polices them.

Honest frames are built with the ``websockets`` library (an implementation independent of the
suite's parser); dishonest ones by hand.
"""

from __future__ import annotations

import os
import struct

import pytest
import torch
from websockets.frames import Frame, Opcode
from websockets.utils import accept_key as reference_accept_key

from secure_channel._records import FRAME_REQUEST, FRAME_RESPONSE, HEADER, RECORD_VERSION
from threat_model._capture._reassembly import Chunk, Direction, TcpStream
from threat_model._completeness import _unread
from threat_model._ledger import ClientConnection
from threat_model._stream_allowlist import accept_key, websocket_violations
from threat_model._websocket import BINARY, CLOSE, PING, read_websocket
from threat_model.allowlist import allowlist_checks, keystream_reuse
from threat_model.detectors import IN_FRAME, TextLeakDetector, scan_streams
from threat_model.eavesdrop import plaintext_frames
from threat_model.traffic import messages

SID = os.urandom(16)
ROUTE = os.urandom(16).hex()
KEY = "dGhlIHNhbXBsZSBub25jZQ=="  # RFC 6455's example key
SECRET = b"I live in Paris and my doctor says I have the flu."


def upgrade(*extra: str, key: str = KEY) -> bytes:
    lines = ["GET /v1/stream HTTP/1.1", "Host: 127.0.0.1:8443", "Upgrade: websocket", "Connection: Upgrade",
             f"Sec-WebSocket-Key: {key}", "Sec-WebSocket-Version: 13", f"x-lambda-route: {ROUTE}",
             f"x-lambda-session: {SID.hex()}", *extra]  # fmt: skip
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def switched(accept: str | None = None) -> bytes:
    lines = ["HTTP/1.1 101 Switching Protocols", "upgrade: websocket", "connection: Upgrade",
             f"sec-websocket-accept: {accept or reference_accept_key(KEY)}",
             "date: Sat, 28 Nov 2026 12:47:19 GMT", "server: uvicorn"]  # fmt: skip
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def frame(opcode: Opcode, data: bytes, *, client: bool, fin: bool = True) -> bytes:
    return Frame(opcode, data, fin=fin).serialize(mask=client)


def sealed(size: int = 120, epoch: int = 0) -> bytes:
    """A sealed record in the stream's compact form: its epoch's low byte, ciphertext and tag."""
    return bytes((epoch & 0xFF,)) + os.urandom(size)


def stream(c2s: bytes, s2c: bytes) -> TcpStream:
    return TcpStream(("127.0.0.1", 40000), ("127.0.0.1", 8443),
                     Direction(c2s, (Chunk(0.0, 0, len(c2s)),), ()), Direction(s2c, (Chunk(0.5, 0, len(s2c)),), ()),
                     0.0, 1.0, True)  # fmt: skip


def honest(steps: int = 3, epochs: list[int] | None = None) -> tuple[bytes, bytes]:
    """A sealed stream of ``steps`` requests and responses; record i of each direction is sealed
    under epoch ``epochs[i]`` (0 for all by default)."""
    c2s, s2c = upgrade(), switched()
    for epoch in epochs or [0] * steps:
        c2s += frame(Opcode.BINARY, sealed(epoch=epoch), client=True)
        s2c += frame(Opcode.BINARY, sealed(epoch=epoch), client=False)
    c2s += frame(Opcode.CLOSE, struct.pack("!H", 1000), client=True)
    s2c += frame(Opcode.CLOSE, struct.pack("!H", 1000), client=False)
    return c2s, s2c


# --- reading the framing -------------------------------------------------------------------------


def test_masked_fragmented_messages_are_unmasked_and_joined_around_control_frames() -> None:
    c2s = upgrade() + frame(Opcode.BINARY, SECRET[:20], client=True, fin=False)
    c2s += frame(Opcode.PING, b"abcd", client=True) + frame(Opcode.CONT, SECRET[20:], client=True)
    assert SECRET[:8] not in c2s  # masked on the wire
    view = read_websocket(stream(c2s, switched()))
    assert view is not None and not view.c2s.problems and view.c2s.unparsed == -1
    [ping, message] = view.c2s.messages
    assert (ping.opcode, ping.data) == (PING, b"abcd")
    assert (message.opcode, message.data, len(message.frames)) == (BINARY, SECRET, 2)


def test_long_lengths_use_the_extended_fields() -> None:
    for size in (125, 126, 65535, 65536):
        data = os.urandom(size)
        view = read_websocket(stream(upgrade() + frame(Opcode.BINARY, data, client=True), switched()))
        assert view is not None and [m.data for m in view.c2s.messages] == [data] and not view.c2s.problems


@pytest.mark.parametrize(
    ("raw", "client", "problem"),
    [
        (b"\x82\x03abc", True, "unmasked client frame"),
        (b"\x82\x83abcd" + b"xyz", False, "masked server frame"),
        (b"\xc2\x03abc", False, "reserved bits set"),
        (b"\x83\x03abc", False, "unknown opcode 3"),
        (b"\x82\x7e\x00\x03abc", False, "payload length not in its shortest encoding"),
        (b"\x09\x03abc", False, "control frame longer than 125 bytes or fragmented"),
        (b"\x80\x03abc", False, "continuation frame without a message to continue"),
        (b"\x02\x03abc", False, "fragmented message never finished"),
        (b"\x82\x10abc", False, "WebSocket frame runs past the end of the stream"),
    ],
)
def test_every_deviation_from_the_framing_is_a_problem(raw: bytes, client: bool, problem: str) -> None:
    c2s, s2c = (upgrade() + raw, switched()) if client else (upgrade(), switched() + raw)
    view = read_websocket(stream(c2s, s2c))
    assert view is not None
    found = view.c2s if client else view.s2c
    assert any(problem in p for _, p in found.problems), found.problems


def test_a_connection_that_did_not_switch_protocols_is_not_a_websocket() -> None:
    refused = b"HTTP/1.1 401 Unauthorized\r\ncontent-length: 0\r\n\r\n"
    assert read_websocket(stream(upgrade(), refused)) is None
    assert read_websocket(stream(b"POST /v1/secure HTTP/1.1\r\n\r\n", switched())) is None


# --- what the detectors read ---------------------------------------------------------------------


def test_a_secret_in_masked_and_fragmented_frames_is_found_where_it_crossed() -> None:
    c2s = upgrade() + frame(Opcode.BINARY, SECRET[:9], client=True, fin=False)
    c2s += frame(Opcode.CONT, SECRET[9:], client=True)
    detector = TextLeakDetector([SECRET.decode()])
    assert detector.scan(c2s) == []  # the raw bytes hide it: only an observer who unmasks sees it
    findings = scan_streams([detector], [stream(c2s, switched())])
    assert findings and all(f.direction == "c2s" and f.variant.endswith(IN_FRAME) for f in findings)
    assert min(f.offset for f in findings) == len(upgrade()) + 6  # the first payload byte on the wire


def test_bytes_after_the_framing_breaks_are_still_scanned() -> None:
    s2c = switched() + b"\x82\x7f" + SECRET  # a 64-bit length that runs past the end
    findings = scan_streams([TextLeakDetector([SECRET.decode()])], [stream(upgrade(), s2c)])
    assert findings and not findings[0].variant.endswith(IN_FRAME)


def test_a_plaintext_frame_in_a_masked_stream_message_decodes() -> None:
    from lambda_split.protocol import Encoding, FrameKind, StreamOp, encode_frame

    hidden = torch.randn(1, 3, 8)
    body = encode_frame(FrameKind.LLM_STEP, SID, 0, {"hidden": (hidden, Encoding.parse("fp32"))})
    c2s = upgrade() + frame(Opcode.BINARY, bytes((StreamOp.STEP,)) + body, client=True)
    [found] = plaintext_frames([stream(c2s, switched())])
    assert found.direction == "c2s" and torch.equal(found.frame.tensors["hidden"], hidden)


def test_the_clients_bound_step_decodes_after_its_op_and_handle_bytes() -> None:
    """What the client sends on the stream (no session id, no all-ones mask), and the server's reply
    (op byte, then the result frame: no handle)."""
    from lambda_split.protocol import Encoding, FrameKind, StreamOp, encode_frame

    hidden = torch.randn(1, 1, 64)
    body = encode_frame(FrameKind.LLM_STEP, None, 4, {"hidden": (hidden, Encoding.parse("fp16"))})
    c2s = upgrade() + frame(Opcode.BINARY, bytes((StreamOp.BOUND_STEP, 1)) + body, client=True)
    s2c = switched() + frame(Opcode.BINARY, bytes((StreamOp.BOUND_STEP,)) + body, client=False)
    found = plaintext_frames([stream(c2s, s2c)])
    assert [f.direction for f in found] == ["c2s", "s2c"] and all(f.frame.seq == 4 for f in found)
    assert torch.equal(found[0].frame.tensors["hidden"], hidden.half().float())


def test_only_step_messages_are_read_as_frames_and_only_where_the_protocol_puts_them() -> None:
    """Frames carry no magic: the observer reads them by the protocol's structure, as the endpoints do."""
    from lambda_split.protocol import Encoding, FrameKind, StreamOp, encode_frame

    body = encode_frame(FrameKind.LLM_STEP, None, 4, {"hidden": (torch.randn(1, 1, 8), Encoding.FP32)})
    c2s = upgrade() + b"".join(
        frame(Opcode.BINARY, bytes((op,)) + body, client=True)
        for op in (
            StreamOp.OPEN,
            StreamOp.CLOSE,
            StreamOp.ERROR,
            9,
            StreamOp.BOUND_STEP,
        )  # a handle byte is due
    )
    s2c = switched() + frame(Opcode.BINARY, bytes((StreamOp.ERROR,)) + body, client=False)
    assert plaintext_frames([stream(c2s, s2c)]) == []
    s2c += frame(Opcode.BINARY, bytes((StreamOp.STEP,)) + body, client=False)
    c2s += frame(Opcode.TEXT, bytes((StreamOp.STEP,)) + body, client=True)
    assert [f.direction for f in plaintext_frames([stream(c2s, s2c)])] == ["s2c"]


def test_the_observer_knows_the_protocol_constants_it_spells_out() -> None:
    from lambda_split import protocol
    from threat_model import eavesdrop

    assert eavesdrop.FRAME_CONTENT_TYPE == protocol.FRAME_CONTENT_TYPE
    assert (eavesdrop.STEP, eavesdrop.BOUND_STEP) == (protocol.StreamOp.STEP, protocol.StreamOp.BOUND_STEP)


def test_traffic_analysis_delimits_websocket_messages() -> None:
    found = messages(stream(*honest(2)))
    kinds = [(m.direction, m.kind, m.detail) for m in found if m.kind == "ws-message"]
    assert kinds.count(("c2s", "ws-message", "binary")) == 2 and ("s2c", "ws-message", "close") in kinds


# --- the allowlist of a sealed stream -------------------------------------------------------------


def test_our_accept_key_is_the_rfc_one() -> None:
    assert accept_key(KEY) == "s3pPLMBiTxaQ9kYGzzhZRbK+xOo=" == reference_accept_key(KEY)


def test_an_honest_sealed_stream_passes_and_its_records_carry_the_session_back() -> None:
    records: list[tuple[int, bytes]] = []
    assert websocket_violations(stream(*honest()), records) == []
    assert [kind for kind, _ in records] == [FRAME_REQUEST] * 3 + [FRAME_RESPONSE] * 3
    headers = [HEADER.unpack_from(body) for _, body in records]
    assert headers == [
        (RECORD_VERSION, kind, SID, 0, seq) for kind in (FRAME_REQUEST, FRAME_RESPONSE) for seq in range(3)
    ]
    assert keystream_reuse(records) == []
    [verdict, keys] = allowlist_checks("aesgcm", [[stream(*honest())]])
    assert verdict["passed"] and keys["passed"]


def test_the_observer_tracks_the_epoch_through_rekeys_and_its_wrap() -> None:
    """Each record keeps its direction's epoch or moves it on by one; the low byte wraps 255 -> 0."""
    epochs = [0, 0, 1, 1, 2, *range(3, 260)]
    records: list[tuple[int, bytes]] = []
    assert websocket_violations(stream(*honest(epochs=epochs)), records) == []
    requests = [HEADER.unpack_from(body) for kind, body in records if kind == FRAME_REQUEST]
    assert [(epoch, seq) for *_, epoch, seq in requests] == [(e, i) for i, e in enumerate(epochs)]
    assert requests[-1][3] == 259  # the wire said 3


def _in_another_session(c2s: bytes) -> bytes:
    return c2s.replace(SID.hex().encode(), os.urandom(16).hex().encode())


def test_two_streams_sealing_under_the_same_key_and_nonce_are_found() -> None:
    """The fresh-keys check sees a stream's records as full records: the same request ciphertexts
    at the same (epoch, sequence) in two channel sessions are keystream reuse; fresh ones are not."""
    c2s, _ = honest()
    records: list[tuple[int, bytes]] = []
    for data in (c2s, _in_another_session(c2s)):
        assert websocket_violations(stream(data, switched()), records) == []
    assert [kind for kind, _ in records] == [FRAME_REQUEST] * 6
    assert len(keystream_reuse(records)) == 3
    fresh: list[tuple[int, bytes]] = []
    for data in (honest()[0], _in_another_session(honest()[0])):
        assert websocket_violations(stream(data, switched()), fresh) == []
    assert keystream_reuse(fresh) == []


def _tamper_c2s(c2s: bytes, s2c: bytes, how: str) -> tuple[bytes, bytes]:
    close = frame(Opcode.CLOSE, struct.pack("!H", 1000), client=True)
    body = c2s[len(upgrade()) : -len(close)]
    if how == "extra header":
        return upgrade("x-trace: SSBsaXZlIGluIFBhcmlz") + body + close, s2c
    if how == "user agent":
        return upgrade("User-Agent: curl/8") + body + close, s2c
    if how == "text frame":
        return c2s[: -len(close)] + frame(Opcode.TEXT, SECRET, client=True) + close, s2c
    if how == "plaintext record":
        return c2s[: -len(close)] + frame(
            Opcode.BINARY, b"\x02\x03\x01\x01\x00" + SECRET, client=True
        ) + close, s2c
    if how == "client ping":
        return c2s[: -len(close)] + frame(Opcode.PING, b"hi", client=True) + close, s2c
    if how == "pong without ping":
        return c2s[: -len(close)] + frame(Opcode.PONG, b"hi", client=True) + close, s2c
    if how == "close reason":
        return c2s[: -len(close)] + frame(Opcode.CLOSE, struct.pack("!H", 1000) + b"Paris", client=True), s2c
    if how == "unmasked":
        return c2s[: -len(close)] + b"\x82\x20" + sealed(31), s2c
    if how == "epoch skipped":
        return c2s[: -len(close)] + frame(Opcode.BINARY, sealed(epoch=2), client=True) + close, s2c
    if how == "epoch back":
        rekeyed = honest(epochs=[0, 1])[0]
        return rekeyed[: -len(close)] + frame(Opcode.BINARY, sealed(epoch=0), client=True) + close, s2c
    if how == "short record":
        return c2s[: -len(close)] + frame(Opcode.BINARY, sealed(15), client=True) + close, s2c
    if how == "wrong accept":
        return c2s, switched(reference_accept_key("AAAAAAAAAAAAAAAAAAAAAA==")) + s2c[len(switched()) :]
    if how == "server ping":
        return c2s, s2c + frame(Opcode.PING, b"\x01\x02\x03\x04", client=False)
    if how == "extra response":
        return c2s, s2c + frame(Opcode.BINARY, sealed(), client=False)
    if how == "trailing bytes":
        return c2s + b"\x82", s2c
    raise AssertionError(how)


@pytest.mark.parametrize(
    ("how", "reason"),
    [
        ("extra header", "header 'x-trace' is not in the allowlist"),
        ("user agent", "header 'user-agent' is not in the allowlist"),
        ("text frame", "text message to the server"),
        ("plaintext record", "is not a sealed request record"),
        ("client ping", "ping message to the server"),
        ("pong without ping", "pong message to the server"),
        ("server ping", "ping message from the server"),
        ("close reason", "close frame with a reason outside its allowed shape"),
        ("unmasked", "unmasked client frame"),
        ("epoch skipped", "is not a sealed request record (epoch byte 2, the stream's epoch is 0)"),
        ("epoch back", "is not a sealed request record (epoch byte 0, the stream's epoch is 1)"),
        ("short record", "stream message of 16 bytes is shorter than a sealed record"),
        ("wrong accept", "sec-websocket-accept does not answer the client's key"),
        ("extra response", "more sealed responses than requests"),
        ("trailing bytes", "truncated WebSocket frame header"),
    ],
)
def test_anything_else_on_a_sealed_stream_is_a_violation(how: str, reason: str) -> None:
    violations = websocket_violations(stream(*_tamper_c2s(*honest(), how)))
    assert any(reason in v.reason for v in violations), [str(v) for v in violations]


# --- completeness --------------------------------------------------------------------------------


def test_the_servers_unread_close_frame_is_the_only_surplus_allowed() -> None:
    c2s, s2c = honest()
    close = frame(Opcode.CLOSE, struct.pack("!H", 1000), client=False)
    read = len(s2c) - len(close)
    connection = ClientConnection(("127.0.0.1", 40000), ("127.0.0.1", 8443), 0.0, "t", len(c2s), read)
    assert _unread(stream(c2s, s2c), connection) == len(close)
    tail = frame(Opcode.BINARY, b"more", client=False)
    assert _unread(stream(c2s, s2c[:read] + tail), connection) is None
    assert Opcode.CLOSE.value == CLOSE


def test_in_tls_the_servers_close_may_come_between_the_clients_close_frame_and_its_close_notify() -> None:
    """Client: last request (t=0), its WebSocket close (t=2), its close_notify (t=4). Server: the last
    reply, read (t=1), then TLS records the client never read (its close frame, its close_notify)."""
    record = b"\x17\x03\x03\x00\x15" + os.urandom(21)
    read = b"\x17\x03\x03\x00\x40" + os.urandom(64)

    def tls(unread_at: float) -> TcpStream:
        c2s = Direction(b"x" * 30, (Chunk(0.0, 0, 10), Chunk(2.0, 10, 10), Chunk(4.0, 20, 10)), ())
        s2c = Direction(
            read + record, (Chunk(1.0, 0, len(read)), Chunk(unread_at, len(read), len(record))), ()
        )
        return TcpStream(("127.0.0.1", 40000), ("127.0.0.1", 8443), c2s, s2c, 0.0, 5.0, True)

    connection = ClientConnection(("127.0.0.1", 40000), ("127.0.0.1", 8443), 0.0, "t", 30, len(read))
    assert _unread(tls(3.0), connection) == len(record)
    assert (
        _unread(tls(1.5), connection) is None
    )  # sent before the client began to close: it should have read it
