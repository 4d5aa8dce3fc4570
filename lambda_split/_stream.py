"""How a remote session reaches the trunk: one persistent stream (the default), or one request per operation.

:class:`StreamLink` carries open, step and close as messages of one stream from
``Transport.open_stream`` (the Stream API of :mod:`lambda_split.protocol`), opened on first
use and re-opened for a new session after the server closed it; :class:`HTTPLink` sends each
as its own request through ``Transport.exchange`` (``--transport http``). Both raise the same errors.
"""

from __future__ import annotations

import json
import secrets
import threading
from typing import Any, Literal, Protocol

from lambda_split._errors import ProtocolMismatch, ServerError
from lambda_split.protocol import (
    FRAME_CONTENT_TYPE,
    ROUTE_HEADER,
    SESSIONS_PATH,
    STREAM_PATH,
    StreamOp,
    session_path,
    step_path,
)
from secure_channel import Request, Response, Stream, StreamUnsupported, Transport, TransportError

TransportKind = Literal["stream", "http"]
TRANSPORT_KINDS: tuple[TransportKind, ...] = ("stream", "http")


class Link(Protocol):
    """What a :class:`RemoteSession` needs: open a session, run a step, close it."""

    def open(self, wire: str, options: dict[str, Any] | None = None) -> Any: ...
    def step(self, session_id: str, frame: bytes) -> bytes: ...
    def close(self, session_id: str) -> None: ...


def check_reply(response: Response, expected: int) -> Response:
    """Return ``response`` if its status is ``expected``; else raise ServerError with the server's code."""
    if response.status == expected:
        return response
    try:
        error = response.json()["error"]
        code, message = str(error["code"]), str(error["message"])
    except (ValueError, KeyError, TypeError):
        code, message = "http_error", f"unexpected HTTP {response.status}"
    raise ServerError(response.status, code, message)


def json_request(method: str, path: str, data: Any = None) -> Request:
    body = b"" if data is None else json.dumps(data).encode()
    return Request(method, path, body, {"content-type": "application/json"} if body else {})


class HTTPLink:
    """One HTTP request per operation (for transports or networks that cannot stream)."""

    def __init__(self, transport: Transport) -> None:
        self.transport = transport

    def open(self, wire: str, options: dict[str, Any] | None = None) -> Any:
        body = {"wire": wire, **(options or {})}
        return check_reply(self.transport.exchange(json_request("POST", SESSIONS_PATH, body)), 201).json()

    def step(self, session_id: str, frame: bytes) -> bytes:
        request = Request("POST", step_path(session_id), frame, {"content-type": FRAME_CONTENT_TYPE})
        return check_reply(self.transport.exchange(request), 200).content

    def close(self, session_id: str) -> None:
        check_reply(self.transport.exchange(Request("DELETE", session_path(session_id))), 200)


class StreamLink:
    """All sessions of one client over one persistent stream of ``transport`` (see module doc)."""

    def __init__(self, transport: Transport) -> None:
        self.transport = transport
        self._stream: Stream | None = None
        self._generation = 0  # counts the streams opened; a session lives only on the one it was opened on
        self._sessions: dict[str, tuple[int, int]] = {}  # session id -> (generation, handle on that stream)
        self._lock = threading.Lock()

    def _call(self, op: StreamOp, body: bytes, *, reopen: bool = False) -> bytes:
        with self._lock:
            if self._stream is None or reopen:
                if op != StreamOp.OPEN:  # a step or close belongs to a stream that is gone
                    raise TransportError(
                        "the stream that carried this session has closed; so has the session"
                    )
                self._drop()
                self._stream = self.transport.open_stream(STREAM_PATH, {ROUTE_HEADER: secrets.token_hex(16)})
                self._generation += 1
            try:
                self._stream.send(bytes((op,)) + body)
                reply = self._stream.recv()
            except BaseException:
                self._drop()  # its sessions are gone on the server too
                raise
        if not reply:
            raise ProtocolMismatch("empty stream message from the server")
        if reply[0] == StreamOp.ERROR:
            try:
                data = json.loads(reply[1:])
                status, code, message = (
                    int(data["status"]),
                    str(data["error"]["code"]),
                    str(data["error"]["message"]),
                )
            except (ValueError, KeyError, TypeError):
                raise ProtocolMismatch("malformed error message on the stream") from None
            raise ServerError(status, code, message)
        if reply[0] != op:
            raise ProtocolMismatch("the server's stream message does not answer the request")
        return reply[1:]

    def open(self, wire: str, options: dict[str, Any] | None = None) -> Any:
        body = json.dumps({"wire": wire, **(options or {})}).encode()
        kept = self._stream is not None
        try:
            reply = self._call(StreamOp.OPEN, body)
        except ServerError:
            raise
        except Exception:
            if not kept:
                raise
            # A stream kept from an earlier session may have been closed by the server while idle;
            # a new session may open a new stream (nothing of this session has run yet).
            reply = self._call(StreamOp.OPEN, body, reopen=True)
        try:
            data = json.loads(reply)
            handle = data["handle"]
            if not isinstance(handle, int) or not 1 <= handle <= 255:
                raise ValueError("bad handle")
            self._sessions[str(data["session_id"])] = (self._generation, handle)
        except (ValueError, KeyError, TypeError):
            raise ProtocolMismatch("malformed session reply") from None
        return data

    def _alive(self, session_id: str) -> bool:
        bound = self._sessions.get(session_id)
        return self._stream is not None and bound is not None and bound[0] == self._generation

    def step(self, session_id: str, frame: bytes) -> bytes:
        """Run ``frame`` (without a session id) in the session its stream handle names."""
        if not self._alive(session_id):
            raise TransportError("the stream that carried this session has closed; so has the session")
        return self._call(StreamOp.BOUND_STEP, bytes((self._sessions[session_id][1],)) + frame)

    def close(self, session_id: str) -> None:
        """Close the session; a no-op once its stream is gone (the server closed the session then)."""
        alive = self._alive(session_id)
        self._sessions.pop(session_id, None)
        if alive:
            self._call(StreamOp.CLOSE, session_id.encode())

    def _drop(self) -> None:
        if self._stream is not None:
            stream, self._stream = self._stream, None
            stream.close()

    def shutdown(self) -> None:
        with self._lock:
            self._drop()


def _can_stream(transport: Transport) -> bool:
    """True when ``transport`` implements :meth:`Transport.open_stream`."""
    return type(transport).open_stream is not Transport.open_stream


def make_link(transport: Transport, kind: TransportKind | None) -> HTTPLink | StreamLink:
    """``stream`` or ``http`` as named. None (the default) means ``stream`` when the transport can
    open streams, else ``http``. Either way the security mode is the transport's own, so no choice
    here changes it: only the framing of the same sealed (or TLS, or plain) bytes differs."""
    if kind is None:
        kind = "stream" if _can_stream(transport) else "http"
    if kind == "http":
        return HTTPLink(transport)
    if kind != "stream":
        raise ValueError(f"unknown transport {kind!r}; choose stream or http")
    if not _can_stream(transport):
        raise StreamUnsupported(f"{type(transport).__name__} cannot open streams; use --transport http")
    return StreamLink(transport)
