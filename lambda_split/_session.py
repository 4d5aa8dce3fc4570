"""One trunk session on the server, seen from the client: open, exchange frames, close."""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, TypeVar

import torch

from lambda_split._codec import Encoding, Frame, FrameError, FrameKind, decode_frame, encode_frame
from lambda_split._errors import ProtocolMismatch, ServerError
from lambda_split.protocol import FRAME_CONTENT_TYPE, SESSIONS_PATH, session_path, step_path
from secure_channel import Request, Response, SecurityMode, Transport

T = TypeVar("T")


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


class RemoteSession:
    """A session opened on construction; each :meth:`exchange` sends one frame and checks the reply
    answers it (kind, session id, sequence number)."""

    def __init__(self, transport: Transport, wire: Encoding) -> None:
        self.transport = transport
        self.wire = wire
        request = json_request("POST", SESSIONS_PATH, {"wire": wire.wire_name})
        reply = check_reply(self.transport.exchange(request), 201)
        try:
            self.session_id = str(reply.json()["session_id"])
            self._raw_id = bytes.fromhex(self.session_id)
        except (ValueError, KeyError, TypeError):
            raise ProtocolMismatch("malformed session reply") from None
        self.seq = 0
        self.closed = False

    def exchange(
        self, kind: FrameKind, tensors: Mapping[str, tuple[torch.Tensor, Encoding]], expect: FrameKind
    ) -> Frame:
        frame = encode_frame(kind, self._raw_id, self.seq, tensors)
        request = Request("POST", step_path(self.session_id), frame, {"content-type": FRAME_CONTENT_TYPE})
        reply = check_reply(self.transport.exchange(request), 200)
        try:
            result = decode_frame(reply.content)
        except FrameError as exc:
            raise ProtocolMismatch(f"bad frame from server: {exc}") from None
        if result.kind is not expect or result.session_id != self._raw_id or result.seq != self.seq:
            raise ProtocolMismatch("server reply does not answer this step")
        self.seq += 1
        return result

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            check_reply(self.transport.exchange(Request("DELETE", session_path(self.session_id))), 200)


def connect_verified(
    url: str,
    security: SecurityMode,
    keys: str | Path | None,
    timeout: float,
    verify: Callable[[Transport], T],
) -> T:
    """Open a transport in ``security`` mode and hand it to ``verify`` (a client's ``from_transport``);
    the transport is closed again if verification fails."""
    from lambda_split._diagnose import explain
    from secure_channel import connect_transport

    transport = connect_transport(url, security, keys_dir=keys, timeout=timeout)
    try:
        return verify(transport)
    except Exception as exc:
        transport.close()
        better = explain(exc, url, security, keys, timeout)
        if better is None:
            raise
        raise better from exc
    except BaseException:
        transport.close()
        raise
