"""A hostile peer against the stream: each abuse gets a clean close (code and reason) or an error
message, the server stays up, and an honest client's output is unchanged afterwards."""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lambda_split import Checkpoint, GenerationConfig, ServerError, SplitClient
from lambda_split.protocol import ROUTE_HEADER, STREAM_PATH, Encoding, FrameKind, StreamOp, encode_frame
from secure_channel import (
    AESGCMTransport,
    AuthenticationError,
    PlainTransport,
    Stream,
    StreamClosed,
    Transport,
    TransportError,
    connect_transport,
)
from secure_channel._sealed_stream import SealedStream, _compact, _opening
from tests.secure_channel.conftest import PKI
from tests.server.conftest import LiveServer, start_server, wait_for

GREEDY = GenerationConfig(max_new_tokens=8)


def honest_output(server: LiveServer, tiny: Checkpoint, keys: Path | None = None) -> list[int]:
    keys = keys or (None if server.mode == "plain" else server.keys)
    with SplitClient.connect(server.url, security=server.mode, keys=keys, model=tiny) as client:  # type: ignore[arg-type]
        return client.generate("hello", GREEDY).token_ids[0]


def open_raw(server: LiveServer, keys: Path | None = None) -> tuple[Transport, Stream]:
    keys = keys or (None if server.mode == "plain" else server.keys)
    transport = connect_transport(server.url, server.mode, keys_dir=keys)  # type: ignore[arg-type]
    return transport, transport.open_stream(STREAM_PATH, {ROUTE_HEADER: os.urandom(16).hex()})


def call(stream: Stream, op: StreamOp, body: bytes) -> bytes:
    stream.send(bytes((op,)) + body)
    return stream.recv()


def error_code(reply: bytes) -> tuple[int, str]:
    assert reply[0] == StreamOp.ERROR
    data = json.loads(reply[1:])
    assert set(data) == {"status", "error"} and set(data["error"]) == {"code", "message"}
    return data["status"], data["error"]["code"]


@pytest.fixture(scope="module")
def sealed_server(tiny: Checkpoint, server_pki: PKI) -> Iterator[LiveServer]:
    """An aesgcm server of this module's own, with a handshake budget (per source address) that the
    many hostile streams below, each followed by an honest client, do not run out of."""
    server = start_server(tiny, "aesgcm", server_pki.root, handshake_burst=10_000)
    yield server
    server.stop()


@pytest.fixture(scope="module")
def reference(live: dict[str, LiveServer], tiny: Checkpoint) -> list[int]:
    return honest_output(live["plain"], tiny)


@pytest.mark.parametrize("message", [b"", b"\x09", b"\xff" * 40, b"\x00{}"])
def test_unknown_or_empty_messages_close_the_stream(
    live: dict[str, LiveServer], tiny: Checkpoint, reference: list[int], message: bytes
) -> None:
    transport, stream = open_raw(live["plain"])
    with transport, pytest.raises(StreamClosed) as closed:
        stream.send(message)
        stream.recv()
    assert (closed.value.code, closed.value.reason) == (1008, "unknown message")
    assert honest_output(live["plain"], tiny) == reference


def test_a_text_message_closes_the_stream(live: dict[str, LiveServer]) -> None:
    transport, stream = open_raw(live["plain"])
    with transport, pytest.raises(StreamClosed) as closed:
        stream._ws.send_text(b"hello")  # type: ignore[attr-defined]
        stream._flush()  # type: ignore[attr-defined]
        stream.recv()
    assert closed.value.code == 1003


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    body=st.binary(max_size=512),
    op=st.sampled_from([StreamOp.OPEN, StreamOp.STEP, StreamOp.CLOSE, StreamOp.BOUND_STEP]),
)
def test_fuzzed_bodies_get_error_messages_and_the_stream_goes_on(
    live: dict[str, LiveServer], body: bytes, op: StreamOp
) -> None:
    transport, stream = open_raw(live["plain"])
    with transport:
        reply = call(stream, op, body)
        if reply[0] == StreamOp.ERROR:
            status, _ = error_code(reply)
            assert 400 <= status < 500
        opened = json.loads(call(stream, StreamOp.OPEN, b'{"wire": "fp16"}')[1:])
        assert len(opened["session_id"]) == 32  # the stream still serves


def test_an_oversized_message_is_refused_from_its_header(
    make_server: Callable[..., LiveServer], tiny: Checkpoint
) -> None:
    server = make_server("plain", max_body_bytes=64 * 1024)  # stream messages up to 192 KiB
    transport, stream = open_raw(server)
    with transport, pytest.raises(StreamClosed) as closed:
        # the header announces 400 KiB; the server closes before reading (or buffering) the body
        header = b"\x82\xff" + (400 * 1024).to_bytes(8, "big") + b"mask"
        stream._net.write(header + b"\x02" * 100, 5.0)  # type: ignore[attr-defined]
        stream.recv()
    assert closed.value.code == 1009
    honest_output(server, tiny)


def test_a_slow_sender_is_closed_at_the_deadline(
    make_server: Callable[..., LiveServer], tiny: Checkpoint
) -> None:
    server = make_server("plain", idle_timeout_s=1.0)
    transport, stream = open_raw(server)
    with transport, pytest.raises(StreamClosed) as closed:
        # a frame header announcing 4096 masked bytes, then only a few of them
        stream._net.write(b"\x82\xfe\x10\x00" + b"mask" + b"abc", 5.0)  # type: ignore[attr-defined]
        stream.recv()
    assert closed.value.code == 1008 and "no message within" in closed.value.reason
    honest_output(server, tiny)


@pytest.mark.parametrize("mode", ["aesgcm", "tls+aesgcm"])
def test_an_upgrade_without_a_channel_session_is_refused(
    live: dict[str, LiveServer], tiny: Checkpoint, mode: str
) -> None:
    server = live[mode]
    sealed = connect_transport(server.url, mode, keys_dir=server.keys)
    assert isinstance(sealed, AESGCMTransport)
    inner = sealed.inner
    before = server.service.open_sessions
    for headers in ({}, {"x-lambda-session": "00" * 16}, {"x-lambda-session": "zz"}):
        with pytest.raises(AuthenticationError, match="unknown_session"):
            inner.open_stream(STREAM_PATH, headers)
    assert server.service.open_sessions == before
    sealed.close()


def _v1(record: bytes) -> bytes:
    """A stream message of the old format (v1): the full record header less the session id."""
    return record[:2] + record[18:]


@pytest.mark.parametrize(
    ("first", "reason"),
    [
        ("unsealed", "invalid_record"),
        ("garbage", "invalid_record"),
        ("wrong route", "route_mismatch"),
        ("wrong path", "the opening does not match the upgrade request"),
        ("v1 peer", "invalid_record"),  # the old wire form does not open
        ("v1 opening", "the opening does not match the upgrade request"),
        ("truncated", "invalid_record"),
    ],
)
def test_a_stream_whose_first_message_is_not_the_sealed_opening_is_closed(
    sealed_server: LiveServer, tiny: Checkpoint, first: str, reason: str
) -> None:
    server = sealed_server
    sealed = connect_transport(server.url, "aesgcm", keys_dir=server.keys)
    assert isinstance(sealed, AESGCMTransport)
    with sealed:
        channel = sealed._new_channel()
        inner = sealed.inner.open_stream(
            STREAM_PATH, {"x-lambda-session": channel.session_id.hex(), ROUTE_HEADER: "a" * 32}
        )
        v1_opening = b"lambda-split stream v1\x00" + STREAM_PATH.encode() + b"\x00" + b"a" * 32

        def sealed(plaintext: bytes) -> bytes:  # the channel's first record: the stream's sequence 0
            return channel.seal_request(plaintext)[0]

        message = {
            "unsealed": lambda: bytes((StreamOp.OPEN,)) + b'{"wire": "fp32"}',
            "garbage": lambda: os.urandom(80),
            "wrong route": lambda: _compact(sealed(_opening(STREAM_PATH, "b" * 32))),
            "wrong path": lambda: _compact(sealed(_opening("/v1/other", "a" * 32))),
            "v1 peer": lambda: _v1(sealed(v1_opening)),
            "v1 opening": lambda: _compact(sealed(v1_opening)),
            "truncated": lambda: _compact(sealed(_opening(STREAM_PATH, "a" * 32)))[:16],
        }[first]()
        before = server.service.open_sessions
        with pytest.raises(StreamClosed) as closed:
            inner.send(message)
            inner.recv()
        assert (closed.value.code, closed.value.reason) == (1008, reason)
        assert server.service.open_sessions == before  # nothing ran
    assert honest_output(server, tiny) == honest_output(server, tiny)


def test_a_tampered_record_mid_stream_closes_it(live: dict[str, LiveServer], tiny: Checkpoint) -> None:
    server = live["tls+aesgcm"]
    transport, stream = open_raw(server)
    with transport:
        assert call(stream, StreamOp.OPEN, b'{"wire": "fp32"}')[0] == StreamOp.OPEN
        record, _ = stream._channel.seal_request(bytes((StreamOp.OPEN,)) + b"{}")  # type: ignore[attr-defined]
        tampered = bytearray(_compact(record))
        tampered[-1] ^= 1
        with pytest.raises(StreamClosed) as closed:
            stream.inner.send(bytes(tampered))  # type: ignore[attr-defined]
            stream.inner.recv()  # type: ignore[attr-defined]
        assert (closed.value.code, closed.value.reason) == (1008, "invalid_record")
    honest_output(server, tiny)


def _closed_after(inner: Stream, *messages: bytes) -> StreamClosed:
    """Send ``messages``, then read until the server closes the stream (answers before it are read)."""
    for message in messages:
        inner.send(message)
    with pytest.raises(StreamClosed) as closed:
        for _ in range(len(messages) + 1):
            inner.recv()
    return closed.value


@pytest.mark.parametrize(
    "how", ["replayed", "duplicated", "swapped", "dropped", "epoch byte", "next epoch", "truncated", "empty"]
)
def test_a_sealed_message_out_of_place_closes_the_stream(
    sealed_server: LiveServer, tiny: Checkpoint, reference: list[int], how: str
) -> None:
    """The server opens each message under the next sequence and the epoch its byte names: a message
    re-sent, sent twice, out of order, after a gap, under a wrong epoch byte or cut short does not
    open, and the stream is closed with a reason; an honest client is served as before."""
    server = sealed_server
    transport, stream = open_raw(server)
    with transport:
        assert isinstance(stream, SealedStream)
        ask = bytes((StreamOp.CLOSE,)) + b"0" * 32  # answered with an error message; opens nothing
        first, second = (_compact(stream._channel.seal_request(ask)[0]) for _ in range(2))
        inner = stream.inner
        if how == "replayed":
            inner.send(first)
            assert inner.recv()  # answered
            closed = _closed_after(inner, first)
        else:
            closed = {
                "duplicated": lambda: _closed_after(inner, first, first),
                "swapped": lambda: _closed_after(inner, second, first),
                "dropped": lambda: _closed_after(inner, second),
                "epoch byte": lambda: _closed_after(inner, b"\x02" + first[1:]),
                "next epoch": lambda: _closed_after(inner, b"\x01" + first[1:]),
                "truncated": lambda: _closed_after(inner, first[:16]),
                "empty": lambda: _closed_after(inner, b""),
            }[how]()
        assert (closed.code, closed.reason) == (1008, "invalid_record")
    assert honest_output(server, tiny) == reference


def test_a_plain_websocket_to_an_aesgcm_server_never_reaches_the_trunk(live: dict[str, LiveServer]) -> None:
    server = live["aesgcm"]
    before = server.service.open_sessions
    with PlainTransport(server.url) as plain, pytest.raises(AuthenticationError):
        plain.open_stream(STREAM_PATH).send(bytes((StreamOp.OPEN,)) + b"{}")
    assert server.service.open_sessions == before


def test_floods_past_the_stream_limits(
    make_server: Callable[..., LiveServer], tiny: Checkpoint, second_client: Path
) -> None:
    server = make_server("tls", rate_limit_per_s=0.01, rate_limit_burst=30, max_sessions_per_identity=2)
    # messages: the flooder (bob) runs dry; alice, another identity, is untouched
    transport, stream = open_raw(server, second_client)
    with transport:
        opened = [call(stream, StreamOp.OPEN, b'{"wire": "fp32"}') for _ in range(3)]
        assert [r[0] for r in opened[:2]] == [StreamOp.OPEN] * 2
        assert error_code(opened[2]) == (429, "too_many_sessions_for_identity")
        replies = [call(stream, StreamOp.OPEN, b"{}") for _ in range(28)]
        assert error_code(replies[-2])[1] != "rate_limited"  # 30 messages: the burst
        assert error_code(replies[-1]) == (429, "rate_limited")
        # streams per identity (max_sessions_per_identity): bob holds one, a second is allowed, a third refused
        other, _ = open_raw(server, second_client)
        with other, pytest.raises(TransportError, match=r"HTTP 429 \(too_many_streams_for_identity\)"):
            open_raw(server, second_client)
    alice = honest_output(server, tiny)
    assert alice == honest_output(server, tiny)


@pytest.mark.parametrize("mode", ["tls", "aesgcm"])
def test_a_stream_past_the_server_wide_cap_is_refused_cleanly(
    make_server: Callable[..., LiveServer], tiny: Checkpoint, mode: str
) -> None:
    """Over TLS the upgrade gets a JSON 503; in aesgcm the sealed layer has accepted the WebSocket
    already, so the refusal is a close with the error code, never a server-side crash."""
    server = make_server(mode, max_sessions=1, max_concurrency=1)
    first, held = open_raw(server)
    with first:
        assert call(held, StreamOp.OPEN, b'{"wire": "fp32"}')[0] == StreamOp.OPEN
        if mode == "tls":
            with pytest.raises(TransportError, match=r"HTTP 503 \(too_many_streams\)"):
                open_raw(server)
        else:
            second, stream = open_raw(server)
            with second, pytest.raises(StreamClosed) as closed:
                call(stream, StreamOp.OPEN, b"{}")
            assert (closed.value.code, closed.value.reason) == (1013, "too_many_streams")
    assert honest_output(server, tiny) == honest_output(server, tiny)


def test_metrics_count_open_streams(make_server: Callable[..., LiveServer]) -> None:
    import httpx

    server = make_server("plain")
    transport, stream = open_raw(server)
    with transport:
        assert call(stream, StreamOp.OPEN, b"{}")[0] == StreamOp.OPEN  # the stream is being served
        assert "lambda_split_open_streams 1.0" in httpx.get(server.url + "/metrics").text


def test_sessions_per_stream_are_capped(live: dict[str, LiveServer]) -> None:
    transport, stream = open_raw(live["plain"])
    with transport:
        replies = [call(stream, StreamOp.OPEN, b'{"wire": "fp32"}') for _ in range(5)]
        assert [r[0] for r in replies[:4]] == [StreamOp.OPEN] * 4
        assert error_code(replies[4]) == (429, "too_many_sessions_on_stream")
    # and a stream's sessions end with it
    ids = {bytes.fromhex(json.loads(r[1:])["session_id"]) for r in replies[:4]}
    assert wait_for(lambda: not ids & set(live["plain"].service._sessions))


def test_a_step_of_another_streams_session_by_the_same_identity_is_checked_like_http(
    live: dict[str, LiveServer], tiny: Checkpoint
) -> None:
    transport, stream = open_raw(live["plain"])
    with transport:
        frame = encode_frame(
            FrameKind.LLM_STEP,
            bytes(16),
            0,
            {
                "hidden": (torch.zeros(1, 1, tiny.config.hidden_size), Encoding.FP32),
                "mask": (torch.ones(1, 1, dtype=torch.uint8), Encoding.U8),
            },
        )
        assert error_code(call(stream, StreamOp.STEP, frame)) == (404, "session_not_found")


def test_server_errors_reach_the_client_as_server_error(
    live: dict[str, LiveServer], tiny: Checkpoint
) -> None:
    from lambda_split import StreamLink

    with PlainTransport(live["plain"].url) as transport:
        link = StreamLink(transport)
        with pytest.raises(ServerError) as refused:
            link.open("fp64")
        assert refused.value.code == "bad_wire_encoding"
        link.shutdown()


@pytest.mark.parametrize("mode", ["tls", "aesgcm", "tls+aesgcm"])
def test_a_revoked_device_loses_its_open_stream_and_the_other_keeps_its_own(
    tiny: Checkpoint, tmp_path: Path, mode: str
) -> None:
    from secure_channel import CertificateAuthority
    from tests.server.conftest import start_server
    from tests.server.test_identities import make_devices

    devices = make_devices(tmp_path)
    server = start_server(tiny, mode, devices.ca)
    try:
        alice_transport, alice = open_raw(server, devices.alice)
        bob_transport, bob = open_raw(server, devices.bob)
        with alice_transport, bob_transport:
            for stream in (alice, bob):
                assert call(stream, StreamOp.OPEN, b'{"wire": "fp32"}')[0] == StreamOp.OPEN
            CertificateAuthority.open(devices.ca).revoke("alice")
            server.running.server.request_reload()  # what SIGHUP does
            with pytest.raises(TransportError):  # cut off (tls) or closed at her next message (aesgcm)
                call(alice, StreamOp.OPEN, b'{"wire": "fp32"}')
            assert call(bob, StreamOp.OPEN, b'{"wire": "fp32"}')[0] == StreamOp.OPEN
    finally:
        server.stop()


def test_unauthenticated_openings_are_capped_per_identity(
    make_server: Callable[..., LiveServer], tiny: Checkpoint, second_client: Path
) -> None:
    """Streams that never send their sealed opening count against the identity's cap at once."""
    server = make_server("aesgcm", max_sessions_per_identity=2)
    sealed = connect_transport(server.url, "aesgcm", keys_dir=server.keys)
    assert isinstance(sealed, AESGCMTransport)
    with sealed:
        pending = []
        for _ in range(2):
            channel = sealed._new_channel()
            pending.append(
                sealed.inner.open_stream(STREAM_PATH, {"x-lambda-session": channel.session_id.hex()})
            )
        channel = sealed._new_channel()
        with pytest.raises(TransportError, match=r"HTTP 429 \(too_many_streams_for_identity\)"):
            sealed.inner.open_stream(STREAM_PATH, {"x-lambda-session": channel.session_id.hex()})
        assert honest_output(server, tiny, second_client)  # another identity is not affected
        for stream in pending:
            stream.close()
