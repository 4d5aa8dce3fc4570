"""The allowlist passes what the protocols produce and flags anything else, with offset and hex."""

from __future__ import annotations

import os
import ssl

from secure_channel._handshake import HS_VERSION, MSG1, MSG1_SIZE, MSG4, MSG4_SIZE
from secure_channel._records import FRAME_REQUEST, FRAME_RESPONSE, HEADER, RECORD_VERSION
from threat_model._capture._reassembly import Direction, TcpStream
from threat_model.allowlist import keystream_reuse, sealed_http_violations, tls_violations
from threat_model.baselines import CloudBaselineServer, cloud_complete
from threat_model.capture import capture_loopback

SID = os.urandom(16)
DATE = "date: Sat, 28 Nov 2026 12:47:19 GMT"


def stream(c2s: bytes, s2c: bytes) -> TcpStream:
    return TcpStream(("127.0.0.1", 40000), ("127.0.0.1", 8443), Direction(c2s, (), ()), Direction(s2c, (), ()),
                     0.0, 1.0, True)  # fmt: skip


def record(kind: int, sequence: int, ciphertext: bytes, sid: bytes = SID) -> bytes:
    return HEADER.pack(RECORD_VERSION, kind, sid, 0, sequence) + ciphertext


def request(path: str, body: bytes, *extra: str) -> bytes:
    lines = [f"POST {path} HTTP/1.1", "Host: 127.0.0.1:8443", "content-type: application/octet-stream",
             f"Content-Length: {len(body)}", *extra]  # fmt: skip
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


def response(body: bytes, status: str = "200 OK") -> bytes:
    lines = [f"HTTP/1.1 {status}", DATE, "content-type: application/octet-stream", f"content-length: {len(body)}",
             "cache-control: no-store", "x-content-type-options: nosniff"]  # fmt: skip
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


def honest() -> tuple[bytes, bytes]:
    msg1 = bytes((HS_VERSION, MSG1)) + os.urandom(MSG1_SIZE - 2)
    msg4 = bytes((HS_VERSION, MSG4)) + SID + os.urandom(MSG4_SIZE - 18)
    sealed = record(FRAME_REQUEST, 0, os.urandom(200))
    c2s = request("/v1/handshake", msg1) + request("/v1/secure", sealed, f"x-lambda-session: {SID.hex()}")
    s2c = response(msg4) + response(record(FRAME_RESPONSE, 0, os.urandom(300)))
    return c2s, s2c


def test_the_sealed_surface_passes_and_records_are_collected() -> None:
    records: list[tuple[int, bytes]] = []
    assert sealed_http_violations(stream(*honest()), records) == []
    assert [kind for kind, _ in records] == [FRAME_REQUEST, FRAME_RESPONSE]


def test_an_unknown_header_is_flagged_with_offset_and_hex() -> None:
    c2s, s2c = honest()
    leaky = c2s.replace(b"Host:", b"x-trace: AAAA\r\nHost:", 1)
    [violation] = sealed_http_violations(stream(leaky, s2c))
    assert violation.direction == "c2s" and violation.offset == 0
    assert "'x-trace' is not in the allowlist" in violation.reason
    assert bytes.fromhex(violation.excerpt) == leaky[:16]


def test_shapes_bodies_and_framing_are_checked() -> None:
    c2s, s2c = honest()
    cases = {
        "a session header that is not 32 hex digits": c2s.replace(SID.hex().encode(), b"z" * 32),
        "a request line outside the list": c2s.replace(b"POST /v1/secure", b"POST /v1/leak!!"),
        "a body shorter than its length": c2s[:-10],
        "bytes after the last message": c2s + b"hello",
    }
    for name, data in cases.items():
        assert sealed_http_violations(stream(data, s2c)), name
    assert sealed_http_violations(stream(c2s, s2c.replace(b"200 OK", b"403 No", 1)))
    other = record(FRAME_RESPONSE, 0, os.urandom(300), sid=os.urandom(16))
    assert sealed_http_violations(stream(c2s, response(b"\x01\x04" + SID + os.urandom(32)) + response(other)))


def test_keystream_reuse_is_found_only_across_sessions() -> None:
    plaintext_xor = os.urandom(64)
    a = record(FRAME_REQUEST, 3, plaintext_xor + os.urandom(40))
    b = record(FRAME_REQUEST, 3, plaintext_xor + os.urandom(40), sid=os.urandom(16))
    assert keystream_reuse([(FRAME_REQUEST, a), (FRAME_REQUEST, b)])
    fresh = record(FRAME_REQUEST, 3, os.urandom(104), sid=os.urandom(16))
    assert keystream_reuse([(FRAME_REQUEST, a), (FRAME_REQUEST, fresh)]) == []
    assert keystream_reuse([(FRAME_REQUEST, a), (FRAME_REQUEST, a)]) == []  # one session


def test_a_real_tls13_capture_passes_and_plaintext_after_the_hello_does_not(
    tls_contexts: tuple[ssl.SSLContext, ssl.SSLContext],
) -> None:
    server_ctx, client_ctx = tls_contexts
    with CloudBaselineServer(ssl_context=server_ctx) as server, capture_loopback({server.port}) as cap:
        cloud_complete(cap.client_port(server.port), "hello there", ssl_context=client_ctx)
    [tls] = cap.streams()
    assert tls_violations(tls) == []
    injected = tls.c2s.data + b"\x17\x03\x03\x00\x05hello" + b"\x16\x03\x03\x00\x04\x01\x00\x00\x00"
    bad = stream(injected, tls.s2c.data)
    violations = tls_violations(bad)
    # a 5-byte application_data record is too short for a tag; a plaintext handshake record after it
    assert [v.offset for v in violations] == [len(tls.c2s.data), len(tls.c2s.data) + 10]
    assert tls_violations(stream(b"GET / HTTP/1.1\r\n\r\n", tls.s2c.data))[0].reason.startswith("not a TLS")
