"""StreamLink: a session lives on the stream it was opened on; a failure never opens a new stream
just to close (or step) a session the server has already closed with the old one."""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping

import pytest

from lambda_split._stream import StreamLink
from lambda_split.protocol import StreamOp
from secure_channel import Stream, Transport, TransportError, WireStats


class FakeStream(Stream):
    """Answers OPEN with a fresh session id and CLOSE with ``{"closed": true}``; STEP runs ``on_step``."""

    def __init__(self, on_step: Callable[[], bytes]) -> None:
        self.stats = WireStats()
        self.on_step = on_step
        self.reply = b""
        self.sessions = 0
        self.closed = False

    def send(self, message: bytes) -> None:
        op = message[0]
        if op == StreamOp.OPEN:
            self.sessions += 1
            reply = {"session_id": f"{self.sessions:032x}", "handle": self.sessions}
            self.reply = bytes((op,)) + json.dumps(reply).encode()
        elif op == StreamOp.CLOSE:
            self.reply = bytes((op,)) + b'{"closed": true}'
        else:
            self.reply = bytes((op,)) + self.on_step()

    def recv(self) -> bytes:
        return self.reply

    def close(self) -> None:
        self.closed = True


class FakeTransport(Transport):
    security = "plain"

    def __init__(self, on_step: Callable[[], bytes]) -> None:
        self.stats = WireStats()
        self.on_step = on_step
        self.streams: list[FakeStream] = []

    def open_stream(self, path: str, headers: Mapping[str, str] | None = None) -> Stream:
        self.streams.append(FakeStream(self.on_step))
        return self.streams[-1]


def interrupted() -> bytes:
    raise KeyboardInterrupt


def reset() -> bytes:
    raise TransportError("connection reset")


def test_an_interrupted_step_is_not_masked_by_closing_its_session() -> None:
    transport = FakeTransport(interrupted)
    link = StreamLink(transport)
    session = link.open("fp32")["session_id"]
    with pytest.raises(KeyboardInterrupt):
        try:
            link.step(session, b"frame")
        finally:
            link.close(session)  # what RemoteTrunk.close does in the client's finally
    assert len(transport.streams) == 1 and transport.streams[0].closed


def test_a_session_of_a_lost_stream_cannot_step_and_a_new_session_opens_a_new_stream() -> None:
    transport = FakeTransport(reset)
    link = StreamLink(transport)
    old = link.open("fp32")["session_id"]
    with pytest.raises(TransportError, match="connection reset"):
        link.step(old, b"frame")
    with pytest.raises(TransportError, match="stream that carried this session has closed"):
        link.step(old, b"frame")
    assert len(transport.streams) == 1
    transport.on_step = lambda: b"result"
    for stream in transport.streams:
        stream.on_step = transport.on_step
    new = link.open("fp32")["session_id"]
    assert len(transport.streams) == 2
    assert link.step(new, b"frame") == b"result"
    link.close(new)


class HTTPOnly(Transport):
    """A transport that cannot open streams (``open_stream`` not overridden)."""

    security = "plain"

    def __init__(self) -> None:
        self.stats = WireStats()


def test_the_default_is_the_stream_when_the_transport_can_open_one_and_http_otherwise() -> None:
    from lambda_split._stream import HTTPLink, make_link
    from secure_channel import StreamUnsupported

    streaming, http_only = FakeTransport(lambda: b""), HTTPOnly()
    default = make_link(streaming, None)
    assert isinstance(default, StreamLink) and default.transport is streaming  # same transport, same mode
    assert isinstance(make_link(streaming, "http"), HTTPLink)
    fallback = make_link(http_only, None)
    assert isinstance(fallback, HTTPLink) and fallback.transport is http_only
    with pytest.raises(StreamUnsupported, match="--transport http"):
        make_link(http_only, "stream")
    with pytest.raises(ValueError, match="unknown transport"):
        make_link(streaming, "carrier-pigeon")  # type: ignore[arg-type]


def test_every_transport_of_every_mode_can_stream() -> None:
    """So the default is the stream in every mode: each transport secure_channel builds implements it."""
    import secure_channel
    from secure_channel import MockTransport

    def subclasses(cls: type[Transport]) -> list[type[Transport]]:
        return [c for s in cls.__subclasses__() for c in (s, *subclasses(s))]

    ours = [c for c in subclasses(Transport) if c.__module__.startswith(secure_channel.__name__)]
    modes = [c for c in ours if c is not MockTransport]  # the test seam answers exchange only
    assert len(modes) >= 3 and all(c.open_stream is not Transport.open_stream for c in modes), modes
