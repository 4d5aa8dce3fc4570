"""What a passive eavesdropper can decode from captured streams: plaintext tensor frames.

In ``plain`` mode every step request and result is an HTTP body of the frame content type, or a
WebSocket message of the stream (masked client to server, which hides nothing), holding a Λ-Split
frame (see ``lambda_split.protocol``); anyone on the path can parse it and hand the tensors to
:mod:`threat_model.attacks`. In every other mode nothing here decodes.

Frames carry no magic (frame version 3), so the observer finds them the way the endpoints do, by
the protocol's structure, which is public: an HTTP body is a frame when its ``content-type`` is
:data:`~lambda_split.protocol.FRAME_CONTENT_TYPE`; a binary stream message is ``op || body``, and
the body of ``STEP`` is a frame, of ``BOUND_STEP`` client to server a handle byte and then a frame,
and of either op server to client the result frame. Everything else (JSON, errors) is skipped.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from threat_model._capture._reassembly import DirectionName, TcpStream
from threat_model._websocket import BINARY, read_websocket
from threat_model.traffic import _time_at, http_head, http_messages

__all__ = ["CapturedFrame", "plaintext_frames", "session_tensors"]

# lambda_split.protocol's FRAME_CONTENT_TYPE and StreamOp.STEP, BOUND_STEP, spelled out so that
# importing this module does not import torch (tests/threat_model/test_eavesdrop_structure.py pins them)
FRAME_CONTENT_TYPE = "application/vnd.lambda-split.frame"
STEP, BOUND_STEP = 2, 4


@dataclass(frozen=True)
class CapturedFrame:
    stream: int
    direction: str
    ts: float
    frame: Any  # lambda_split.protocol.Frame


def plaintext_frames(streams: Sequence[TcpStream]) -> list[CapturedFrame]:
    """Every well-formed frame found where the protocol puts one (see the module docstring): an
    HTTP body of the frame content type, or a step message of the stream (unmasked), in capture
    order."""

    found: list[CapturedFrame] = []
    for number, stream in enumerate(streams):
        view = read_websocket(stream)
        if view is not None:
            names: tuple[DirectionName, ...] = ("c2s", "s2c")
            for name in names:
                direction = stream.direction(name)
                for ws in view.direction(name).messages:
                    body = _stream_frame(ws.data, name) if ws.opcode == BINARY else None
                    frame = None if body is None else _decode(body)
                    if frame is not None:
                        found.append(CapturedFrame(number, name, _time_at(direction, ws.offset), frame))
            continue
        for message in http_messages(stream):
            if message.kind == "http-chunk" or not message.payload:
                continue
            data = stream.direction(message.direction).data
            if _content_type(data, message.offset) != FRAME_CONTENT_TYPE:
                continue
            body = data[message.offset + message.size - message.payload : message.offset + message.size]
            frame = _decode(body)
            if frame is not None:
                found.append(CapturedFrame(number, message.direction, message.ts, frame))
    return sorted(found, key=lambda f: f.ts)


def _stream_frame(message: bytes, direction: DirectionName) -> bytes | None:
    """The frame in a binary stream message (see the module docstring), or None if it holds none."""
    if not message or message[0] not in (STEP, BOUND_STEP):
        return None
    skip = 2 if message[0] == BOUND_STEP and direction == "c2s" else 1
    return message[skip:]


def _content_type(data: bytes, start: int) -> str:
    """The media type (lower case, no parameters) of the HTTP message whose head starts at ``start``."""
    return http_head(data, start)[1].get("content-type", "").split(";")[0].strip().lower()


def _decode(body: bytes) -> Any:
    from lambda_split.protocol import FrameError, decode_frame

    try:
        return decode_frame(body)
    except FrameError:
        return None


def session_tensors(frames: Sequence[CapturedFrame], name: str = "hidden") -> tuple[list[Any], list[Any]]:
    """(head outputs sent, trunk outputs returned) of one session, ordered by sequence number."""
    sent = sorted((f.frame for f in frames if f.direction == "c2s"), key=lambda fr: fr.seq)
    back = sorted((f.frame for f in frames if f.direction == "s2c"), key=lambda fr: fr.seq)
    return [fr.tensors[name] for fr in sent if name in fr.tensors], [
        fr.tensors[name] for fr in back if name in fr.tensors
    ]
