"""The sealed stream's wire form: one epoch byte, the ciphertext and the tag; the rest is implied
(secure_channel._sealed_stream). In process against the record layer, and live with a rekey per
message through the epoch byte's wrap."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest
from hypothesis import given
from hypothesis import strategies as st

from secure_channel import (
    AESGCMTransport,
    ChannelError,
    ClientChannel,
    Credentials,
    InvalidRecord,
    PlainTransport,
    ServerChannel,
    Stream,
    TransportError,
    WireStats,
    uvicorn_config,
)
from secure_channel._records import FRAME_REQUEST, FRAME_RESPONSE, HEADER, MAX_EPOCH, OVERHEAD, RECORD_VERSION
from secure_channel._sealed_stream import (
    OPEN_ACK,
    OPENING_PREFIX,
    STREAM_OVERHEAD,
    SealedStream,
    _compact,
    _expand,
    _InStep,
    _opening,
)

from .conftest import _start

SID = bytes(range(16))


def pair(rekey_after_messages: int = 1 << 20) -> tuple[ClientChannel, ServerChannel]:
    c2s, s2c = os.urandom(32), os.urandom(32)
    return (
        ClientChannel(SID, c2s, s2c, rekey_after_messages=rekey_after_messages),
        ServerChannel(SID, c2s, s2c, rekey_after_messages=rekey_after_messages),
    )


def to_server(server: ServerChannel, message: bytes) -> tuple[bytes, int]:
    return server.open_request(_expand(message, FRAME_REQUEST, SID, server.expected_request))


def to_client(client: ClientChannel, message: bytes, request: int) -> bytes:
    return client.open_response(_expand(message, FRAME_RESPONSE, SID, client.expected_response), request)


def test_a_stream_message_is_the_record_less_all_of_its_header_but_the_epochs_low_byte() -> None:
    client, server = pair()
    record, sequence = client.seal_request(b"step")
    assert len(record) == len(b"step") + OVERHEAD  # the HTTP path's record is unchanged
    assert HEADER.unpack_from(record) == (RECORD_VERSION, FRAME_REQUEST, SID, 0, 0)
    message = _compact(record)
    assert message == b"\x00" + record[HEADER.size :] and len(message) == len(b"step") + STREAM_OVERHEAD == 21
    assert _expand(message, FRAME_REQUEST, SID, (0, 0)) == record
    assert to_server(server, message) == (b"step", sequence)
    answer = _compact(server.seal_response(b"done", sequence))
    assert to_client(client, answer, sequence) == b"done"
    assert client.expected_response == server.expected_request == (0, 1)


@pytest.mark.parametrize(
    ("expected", "byte", "epoch"),
    [
        ((0, 5), 0, 0),
        ((0, 5), 1, 1),  # the sender rekeyed with this record
        ((7, 5), 7, 7),
        ((255, 5), 255, 255),
        ((255, 5), 0, 256),  # the low byte wraps
        ((256, 5), 1, 257),
        ((MAX_EPOCH, 5), MAX_EPOCH & 0xFF, MAX_EPOCH),
    ],
)
def test_the_epoch_is_the_receivers_or_the_next_whose_low_byte_matches(
    expected: tuple[int, int], byte: int, epoch: int
) -> None:
    full = _expand(bytes((byte,)) + bytes(16), FRAME_RESPONSE, SID, expected)
    assert HEADER.unpack_from(full) == (RECORD_VERSION, FRAME_RESPONSE, SID, epoch, 5)


@pytest.mark.parametrize(
    ("expected", "message"),
    [
        ((0, 0), b"\x02" + bytes(16)),  # two epochs ahead
        ((3, 0), b"\x02" + bytes(16)),  # behind
        ((255, 0), b"\x01" + bytes(16)),
        ((MAX_EPOCH, 0), b"\x00" + bytes(16)),  # no epoch after the last
        ((0, 0), b"\x00" + bytes(15)),  # shorter than a tag and the epoch byte
        ((0, 0), b""),
    ],
)
def test_a_message_the_receiver_cannot_place_is_refused_before_the_tag(
    expected: tuple[int, int], message: bytes
) -> None:
    with pytest.raises(InvalidRecord):
        _expand(message, FRAME_REQUEST, SID, expected)


@pytest.mark.parametrize("how", ["replayed", "duplicated", "swapped", "dropped", "epoch byte", "old format"])
def test_a_message_out_of_place_fails_and_changes_nothing(how: str) -> None:
    """The receiver implies the next sequence: any other record opens under the wrong nonce and AAD."""
    client, server = pair()
    records = [client.seal_request(b"%d" % i)[0] for i in range(3)]
    first, second, third = (_compact(r) for r in records)
    to_server(server, first)
    bad = {
        "replayed": first,
        "duplicated": first,
        "swapped": third,
        "dropped": third,
        "epoch byte": b"\x01" + second[1:],
        "old format": records[1][:2] + records[1][18:],  # v1: the header less the session id
    }[how]
    with pytest.raises(InvalidRecord):
        to_server(server, bad)
    assert server.expected_request == (0, 1)
    assert to_server(server, second) == (b"1", 1) and to_server(server, third) == (b"2", 2)


def test_a_rekey_on_every_message_crosses_the_epoch_bytes_wrap_in_both_directions() -> None:
    client, server = pair(rekey_after_messages=1)
    seen = []
    for i in range(300):
        request, sequence = client.seal_request(b"q%d" % i)
        message = _compact(request)
        assert to_server(server, message) == (b"q%d" % i, i)
        answer = _compact(server.seal_response(b"a%d" % i, sequence))
        assert to_client(client, answer, sequence) == b"a%d" % i
        seen.append((message[0], answer[0]))
    assert seen == [(i & 0xFF, i & 0xFF) for i in range(300)]
    assert server.expected_request == client.expected_response == (299, 300)


@given(st.binary(max_size=64), st.integers(0, 63))
def test_a_flipped_byte_anywhere_is_refused(payload: bytes, where: int) -> None:
    client, server = pair()
    message = bytearray(_compact(client.seal_request(payload)[0]))
    message[where % len(message)] ^= 0x01
    with pytest.raises(InvalidRecord):
        to_server(server, bytes(message))


def test_a_sender_refuses_a_record_sealed_out_of_step() -> None:
    client, _ = pair()
    sent = _InStep()
    records = [client.seal_request(b"")[0] for _ in range(3)]
    sent.compact(records[0])
    with pytest.raises(ChannelError, match="out of step"):
        sent.compact(records[2])  # records[1] was sealed and never sent


class Loopback(Stream):
    """A server end in process: opens each message as the sealed stream server does, answers it."""

    def __init__(self, server: ServerChannel) -> None:
        self.server, self.sent, self.stats = server, _InStep(), WireStats()
        self.replies: list[bytes] = []
        self.closed = False
        self.fail_next_send = False

    def send(self, message: bytes) -> None:
        if self.fail_next_send:
            raise TransportError("broke off")
        plaintext, sequence = to_server(self.server, message)
        answer = OPEN_ACK if plaintext.startswith(OPENING_PREFIX) else plaintext[::-1]
        self.replies.append(self.sent.compact(self.server.seal_response(answer, sequence)))

    def recv(self) -> bytes:
        return self.replies.pop(0)

    def close(self) -> None:
        self.closed = True


def test_the_client_stream_closes_when_a_message_does_not_open() -> None:
    client, server = pair()
    inner = Loopback(server)
    stream = SealedStream(inner, client, "/v1/stream", "a" * 32)
    stream.send(b"abc")
    assert stream.recv() == b"cba"
    stream.send(b"xyz")
    inner.replies[0] = inner.replies[0][:-1] + bytes((inner.replies[0][-1] ^ 1,))
    with pytest.raises(InvalidRecord):
        stream.recv()
    assert inner.closed
    with pytest.raises(TransportError, match="out of step"):
        stream.send(b"more")


def test_the_client_stream_closes_when_a_sealed_message_may_not_have_gone_out() -> None:
    client, server = pair()
    inner = Loopback(server)
    stream = SealedStream(inner, client, "/v1/stream", "a" * 32)
    inner.fail_next_send = True
    with pytest.raises(TransportError, match="broke off"):
        stream.send(b"lost")
    assert inner.closed
    with pytest.raises(TransportError, match="out of step"):
        stream.send(b"next")  # would be sealed as sequence 2 where the server expects 1


def test_the_opening_names_version_2() -> None:
    assert _opening("/v1/stream", "ab") == b"lambda-split stream v2\x00/v1/stream\x00ab"


# --- live: a WebSocket echo behind AESGCMMiddleware, rekeying on every message ----------------------


async def reverse_echo(scope: dict, receive, send) -> None:  # type: ignore[no-untyped-def, type-arg]
    if scope["type"] != "websocket" or (await receive())["type"] != "websocket.connect":
        return
    await send({"type": "websocket.accept"})
    while (message := await receive())["type"] == "websocket.receive":
        await send({"type": "websocket.send", "bytes": message["bytes"][::-1]})


@pytest.fixture(scope="module")
def rekeying_url(server_creds: Credentials) -> Iterator[str]:
    config = uvicorn_config(
        reverse_echo,
        host="127.0.0.1",
        port=0,
        security="aesgcm",
        credentials=server_creds,
        aesgcm_options={"rekey_after_messages": 1},
        log_level="critical",
        lifespan="off",
    )
    server, thread, port = _start(config)
    yield f"http://127.0.0.1:{port}"
    server.should_exit = True
    thread.join(timeout=5)


def test_a_live_stream_rekeys_on_every_message_through_the_epoch_bytes_wrap(
    rekeying_url: str, client_creds: Credentials
) -> None:
    with AESGCMTransport(PlainTransport(rekeying_url), client_creds, rekey_after_messages=1) as transport:
        stream = transport.open_stream("/echo")
        try:
            for i in range(300):
                stream.send(b"message %d" % i)
                assert stream.recv() == (b"message %d" % i)[::-1]
            assert isinstance(stream, SealedStream)
            assert stream._channel.expected_response == (300, 301)  # the opening's answer was epoch 0
        finally:
            stream.close()
