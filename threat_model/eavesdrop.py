"""What a passive eavesdropper can decode from captured streams: plaintext tensor frames.

In ``plain`` mode every step request and result is an HTTP body holding a Λ-Split
frame (see ``lambda_split.protocol``); anyone on the path can parse it and hand the
tensors to :mod:`threat_model.attacks`. In every other mode nothing here decodes.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from threat_model._capture._reassembly import TcpStream
from threat_model.traffic import http_messages

__all__ = ["CapturedFrame", "plaintext_frames", "session_tensors"]

FRAME_MAGIC = b"\x89LSF"


@dataclass(frozen=True)
class CapturedFrame:
    stream: int
    direction: str
    ts: float
    frame: Any  # lambda_split.protocol.Frame


def plaintext_frames(streams: Sequence[TcpStream]) -> list[CapturedFrame]:
    """Every well-formed frame found as an HTTP body in the streams, in capture order."""
    from lambda_split.protocol import FrameError, decode_frame

    found: list[CapturedFrame] = []
    for number, stream in enumerate(streams):
        for message in http_messages(stream):
            if message.kind == "http-chunk" or not message.payload:
                continue
            data = stream.direction(message.direction).data
            body = data[message.offset + message.size - message.payload : message.offset + message.size]
            if not body.startswith(FRAME_MAGIC):
                continue
            try:
                frame = decode_frame(body)
            except FrameError:
                continue
            found.append(CapturedFrame(number, message.direction, message.ts, frame))
    return sorted(found, key=lambda f: f.ts)


def session_tensors(frames: Sequence[CapturedFrame], name: str = "hidden") -> tuple[list[Any], list[Any]]:
    """(head outputs sent, trunk outputs returned) of one session, ordered by sequence number."""
    sent = sorted((f.frame for f in frames if f.direction == "c2s"), key=lambda fr: fr.seq)
    back = sorted((f.frame for f in frames if f.direction == "s2c"), key=lambda fr: fr.seq)
    return [fr.tensors[name] for fr in sent if name in fr.tensors], [
        fr.tensors[name] for fr in back if name in fr.tensors
    ]
