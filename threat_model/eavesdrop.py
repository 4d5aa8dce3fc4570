"""What a passive eavesdropper can decode from captured streams: plaintext tensor frames.

In ``plain`` mode every step request and result is an HTTP body, or a WebSocket message
of the stream (an op byte, for a step a stream handle byte, then the frame; masked client to
server, which hides nothing),
holding a Λ-Split frame (see ``lambda_split.protocol``); anyone on the path can parse it
and hand the tensors to :mod:`threat_model.attacks`. In every other mode nothing here decodes.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from threat_model._capture._reassembly import DirectionName, TcpStream
from threat_model._websocket import BINARY, read_websocket
from threat_model.traffic import _time_at, http_messages

__all__ = ["CapturedFrame", "plaintext_frames", "session_tensors"]

FRAME_MAGIC = b"\x89LSF"


@dataclass(frozen=True)
class CapturedFrame:
    stream: int
    direction: str
    ts: float
    frame: Any  # lambda_split.protocol.Frame


def plaintext_frames(streams: Sequence[TcpStream]) -> list[CapturedFrame]:
    """Every well-formed frame found as an HTTP body or a WebSocket message (unmasked; after the
    stream's op byte) in the streams, in capture order."""

    found: list[CapturedFrame] = []
    for number, stream in enumerate(streams):
        view = read_websocket(stream)
        if view is not None:
            names: tuple[DirectionName, ...] = ("c2s", "s2c")
            for name in names:
                direction = stream.direction(name)
                for ws in view.direction(name).messages:
                    # a stream message is one op byte, then a frame (STEP and its reply), or a
                    # handle byte and a frame (BOUND_STEP), or JSON (open, close)
                    skip = next((n for n in (1, 2) if ws.data[n : n + 4] == FRAME_MAGIC), 0)
                    body = ws.data[skip:]
                    frame = _decode(body) if ws.opcode == BINARY else None
                    if frame is not None:
                        found.append(CapturedFrame(number, name, _time_at(direction, ws.offset), frame))
            continue
        for message in http_messages(stream):
            if message.kind == "http-chunk" or not message.payload:
                continue
            data = stream.direction(message.direction).data
            body = data[message.offset + message.size - message.payload : message.offset + message.size]
            frame = _decode(body)
            if frame is not None:
                found.append(CapturedFrame(number, message.direction, message.ts, frame))
    return sorted(found, key=lambda f: f.ts)


def _decode(body: bytes) -> Any:
    from lambda_split.protocol import FrameError, decode_frame

    if not body.startswith(FRAME_MAGIC):
        return None
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
