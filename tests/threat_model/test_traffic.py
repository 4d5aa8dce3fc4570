"""Traffic analysis: sizes betray token lengths in a streaming API, not in Λ-Split frames."""

from __future__ import annotations

import random
import ssl

import pytest

from threat_model._capture._reassembly import Chunk, Direction, TcpStream
from threat_model.baselines import CloudBaselineServer, cloud_complete, echo_responder
from threat_model.capture import capture_loopback
from threat_model.traffic import bursts, http_messages, length_leak, messages, profile, tls_records

WORDS = [
    "a",
    "I",
    "to",
    "the",
    "cat",
    "sat",
    "on",
    "an",
    "extraordinarily",
    "long",
    "mat",
    "with",
    "incomprehensibilities",
    "and",
    "tiny",
    "bits",
]


def stream_of(c2s: list[tuple[float, bytes]], s2c: list[tuple[float, bytes]]) -> TcpStream:
    def direction(parts: list[tuple[float, bytes]]) -> Direction:
        chunks, offset = [], 0
        for ts, data in parts:
            chunks.append(Chunk(ts, offset, len(data)))
            offset += len(data)
        return Direction(b"".join(d for _, d in parts), tuple(chunks), ())

    return TcpStream(("127.0.0.1", 5), ("127.0.0.1", 6), direction(c2s), direction(s2c), 0.0, 1.0, True)


def post(path: str, body: bytes) -> bytes:
    return f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Length: {len(body)}\r\n\r\n".encode() + body


def ok(body: bytes) -> bytes:
    return f"HTTP/1.1 200 OK\r\nContent-Length: {len(body)}\r\n\r\n".encode() + body


def split_conversation(
    prompt_tokens: int, new_tokens: int, hidden: int = 576, bytes_per: int = 2
) -> TcpStream:
    """A Λ-Split-shaped exchange: prefill frame of T*d*b bytes, then one d*b frame per token."""
    c2s, s2c, t = [], [], 0.0
    for step, count in enumerate([prompt_tokens] + [1] * (new_tokens - 1)):
        frame = b"F" * (48 + count * hidden * bytes_per + count)  # header + hidden + mask
        t += 0.01
        c2s.append((t, post(f"/v1/sessions/abc/step#{step:04d}", frame)))
        s2c.append((t + 0.005, ok(b"R" * (48 + count * hidden * bytes_per))))
    return stream_of(c2s, s2c)


def test_streaming_api_over_tls_reveals_token_lengths(
    tls_contexts: tuple[ssl.SSLContext, ssl.SSLContext],
) -> None:
    server_ctx, client_ctx = tls_contexts
    rng = random.Random(1)
    prompt = " ".join(rng.choice(WORDS) for _ in range(40))
    tokens = echo_responder(prompt)
    with CloudBaselineServer(ssl_context=server_ctx) as server, capture_loopback({server.port}) as cap:
        answer = cloud_complete(cap.client_port(server.port), prompt, stream=True, ssl_context=client_ctx)
    assert answer["text"] == prompt
    [stream] = cap.streams()
    assert messages(stream) == tls_records(stream)
    records = [m for m in tls_records(stream) if m.direction == "s2c" and m.detail == "application_data"]
    while records[-1].payload <= 22:  # close_notify alert (2+1+16), terminating chunk "0\r\n\r\n" (5+1+16)
        records.pop()
    per_token = records[-len(tokens) :]
    leak = length_leak([m.payload for m in per_token], [len(text.encode()) for _, text in tokens])
    assert leak.inferable and leak.exact_rate == 1.0  # Weiss et al.: sizes spell token lengths


def test_split_frames_hide_token_lengths_but_not_counts() -> None:
    rng = random.Random(2)
    token_lengths = [len(rng.choice(WORDS)) for _ in range(30)]
    stream = split_conversation(prompt_tokens=12, new_tokens=len(token_lengths))
    requests = [m for m in http_messages(stream) if m.kind == "http-request"]
    assert len(requests) == len(token_lengths)  # the output length is visible
    decode_sizes = [m.size for m in requests[1:]]
    assert len(set(decode_sizes)) == 1  # constant d*bytes per token
    leak = length_leak(decode_sizes, token_lengths[1:])
    assert not leak.inferable and leak.pearson_r == 0.0


def test_prefill_size_reveals_prompt_length() -> None:
    lengths = [3, 7, 12, 19, 25, 31, 40, 64]
    prefill = [http_messages(split_conversation(n, 2))[0].payload for n in lengths]
    leak = length_leak(prefill, lengths)
    assert leak.inferable and leak.exact_rate == 1.0
    assert leak.slope == pytest.approx(1 / (576 * 2 + 1))


def test_http_parser_handles_chunked_bodies_with_trailers_and_pipelining() -> None:
    chunked = (
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"5\r\nhello\r\n3;ext=1\r\nabc\r\n0\r\nX-Trailer: y\r\n\r\n"
    )
    stream = stream_of([(0.0, post("/a", b"12345") + post("/b", b""))], [(0.1, chunked), (0.2, ok(b"xy"))])
    found = http_messages(stream)
    assert [(m.kind, m.payload) for m in found] == [
        ("http-request", 5),
        ("http-request", 0),
        ("http-response", 8),
        ("http-chunk", 5),
        ("http-chunk", 3),
        ("http-response", 2),
    ]
    assert found[2].size == len(chunked)
    assert profile(stream).count == {"c2s": 2, "s2c": 2}


def test_tls_record_parser_stops_at_a_partial_record() -> None:
    records = b"\x16\x03\x01\x00\x02ab" + b"\x17\x03\x03\x00\x03xyz" + b"\x17\x03\x03\x01\x00short"
    stream = stream_of([(0.0, records)], [])
    assert [(m.detail, m.size) for m in tls_records(stream)] == [("handshake", 7), ("application_data", 8)]


def test_bursts_split_on_direction_change_and_pause() -> None:
    stream = stream_of([(0.0, b"aa"), (0.001, b"bb"), (0.5, b"cc")], [(0.1, b"xyz")])
    assert [(m.direction, m.size) for m in bursts(stream)] == [("c2s", 4), ("s2c", 3), ("c2s", 2)]
    assert messages(stream) == bursts(stream)


def test_length_leak_edge_cases() -> None:
    assert length_leak([10, 10, 10], [1, 2, 3]).r2 == 0.0
    assert length_leak([1, 2, 3, 4], [2, 4, 6, 8]).exact_rate == 1.0
    with pytest.raises(ValueError):
        length_leak([1], [1])
    with pytest.raises(ValueError):
        length_leak([1, 2], [1, 2, 3])


def test_plaintext_frames_are_the_http_bodies_of_the_frame_content_type() -> None:
    """Frames carry no magic: the observer takes the bodies the protocol labels as frames."""
    import torch

    from lambda_split.protocol import FRAME_CONTENT_TYPE, Encoding, FrameKind, encode_frame
    from threat_model.eavesdrop import plaintext_frames

    body = encode_frame(FrameKind.LLM_STEP, None, 3, {"hidden": (torch.randn(1, 1, 8), Encoding.FP16)})

    def message(start: str, content_type: str) -> bytes:
        head = f"{start}\r\nHost: x\r\ncontent-type: {content_type}\r\nContent-Length: {len(body)}\r\n\r\n"
        return head.encode() + body

    step = "POST /v1/sessions/ab/step HTTP/1.1"
    c2s = [(0.0, message(step, "application/json")), (1.0, message(step, FRAME_CONTENT_TYPE.upper()))]
    s2c = [
        (0.5, message("HTTP/1.1 200 OK", "text/plain")),
        (1.5, message("HTTP/1.1 200 OK", FRAME_CONTENT_TYPE)),
    ]
    found = plaintext_frames([stream_of(c2s, s2c)])
    assert [(f.direction, f.ts, f.frame.seq) for f in found] == [("c2s", 1.0, 3), ("s2c", 1.5, 3)]
