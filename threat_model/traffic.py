"""Traffic analysis: what message sizes, counts and timing reveal when content does not.

Encryption hides bytes, not lengths. From a reassembled stream this module recovers
the messages an on-path observer can delimit — HTTP/1.1 requests, responses and
chunks when the stream is plaintext HTTP (also with an AES-GCM body inside), WebSocket
messages after an upgrade (also sealed records inside), TLS records from their 5-byte
headers when it is TLS, otherwise TCP bursts — and tests
whether a known quantity (prompt length, output length, per-token text length) can
be predicted from them.

Comparison with Weiss et al. 2024 ("What Was Your Prompt? A Remote Keylogging Attack
on AI Assistants"): a streaming chat API sends one encrypted record per token whose
size is a constant plus the token's UTF-8 length, so the sequence of record sizes
spells the token-length sequence, from which the answer can be largely reconstructed.
Λ-Split's frames are different: every decode step carries a hidden state of d values,
i.e. a constant ``d * bytes_per_value`` (plus a fixed header) whatever the token was,
so per-token text length is *not* revealed by frame size. What *is* revealed: the
number of decode steps (= generated tokens, up to the stop), their timing, and the
prompt length in tokens, because the prefill frame carries ``T * d * bytes`` bytes.
Padding the prefill to a bucket size and sending dummy steps hides those two.
"""

from __future__ import annotations

import bisect
import itertools
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np

from threat_model._capture._reassembly import Direction, DirectionName, TcpStream

__all__ = [
    "LengthLeak",
    "Message",
    "TrafficProfile",
    "bursts",
    "http_head",
    "http_messages",
    "length_leak",
    "messages",
    "profile",
    "tls_records",
    "websocket_messages",
]

MessageKind = Literal["http-request", "http-response", "http-chunk", "tls-record", "ws-message", "burst"]
_HTTP_START = re.compile(
    rb"(?:GET|POST|PUT|DELETE|HEAD|OPTIONS|PATCH) \S+ HTTP/1\.[01]\r\n|HTTP/1\.[01] \d{3}"
)
_TLS_TYPES = {20, 21, 22, 23}


@dataclass(frozen=True)
class Message:
    """One observable unit: where it sits in its direction's bytes, when it was sent, how big."""

    kind: MessageKind
    direction: DirectionName
    offset: int
    size: int  # bytes on the wire, framing included
    payload: int  # bytes of content: HTTP body, chunk data, TLS record fragment
    ts: float
    detail: str = ""


def _time_at(direction: Direction, offset: int) -> float:
    """Capture time of the segment that carried byte ``offset``."""
    chunks = sorted(direction.chunks, key=lambda c: c.offset)
    index = bisect.bisect_right([c.offset for c in chunks], offset) - 1
    return chunks[max(index, 0)].ts if chunks else math.nan


def tls_records(stream: TcpStream) -> list[Message]:
    """Every complete TLS record in both directions, from the 5-byte record headers."""
    out: list[Message] = []
    names: tuple[DirectionName, ...] = ("c2s", "s2c")
    for name in names:
        direction = stream.direction(name)
        data, pos = direction.data, 0
        while pos + 5 <= len(data) and data[pos] in _TLS_TYPES and data[pos + 1] == 3:
            length = int.from_bytes(data[pos + 3 : pos + 5], "big")
            if pos + 5 + length > len(data):
                break
            kind = {20: "change_cipher_spec", 21: "alert", 22: "handshake", 23: "application_data"}[data[pos]]
            out.append(Message("tls-record", name, pos, 5 + length, length, _time_at(direction, pos), kind))
            pos += 5 + length
    return sorted(out, key=lambda m: (m.ts, m.direction, m.offset))


def http_head(data: bytes, start: int, end: int | None = None) -> tuple[str, dict[str, str]]:
    """The start line and the header fields (names in lower case) of the HTTP head at ``start``,
    which ends at ``end`` (the blank line; found if not given)."""
    end = data.find(b"\r\n\r\n", start) if end is None else end
    start_line, *lines = data[start:end].decode("latin-1").split("\r\n")
    return start_line, {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines)}


def _http_direction(direction: Direction, name: DirectionName) -> list[Message]:
    data, pos, out = direction.data, 0, []
    while pos < len(data):
        end = data.find(b"\r\n\r\n", pos)
        if end < 0 or not _HTTP_START.match(data, pos):
            break
        start_line, headers = http_head(data, pos, end)
        kind: MessageKind = "http-response" if start_line.startswith("HTTP/") else "http-request"
        body_start = end + 4
        if headers.get("transfer-encoding", "").lower() == "chunked":
            cursor, chunks, body = body_start, [], 0
            while True:
                line_end = data.find(b"\r\n", cursor)
                if line_end < 0:
                    break
                size = int(data[cursor:line_end].split(b";")[0] or b"0", 16)
                chunk_end = line_end + 2 + size + 2
                if size:
                    at = _time_at(direction, cursor)
                    chunks.append(Message("http-chunk", name, cursor, chunk_end - cursor, size, at))
                body += size
                if size == 0:  # last chunk, optional trailers, blank line
                    blank = data.find(b"\r\n\r\n", line_end)
                    cursor = blank + 4 if blank >= 0 else len(data)
                    break
                cursor = chunk_end
            out.append(Message(kind, name, pos, cursor - pos, body, _time_at(direction, pos), start_line))
            out += chunks
            pos = cursor
        else:
            body = int(headers.get("content-length", "0"))
            out.append(
                Message(kind, name, pos, body_start + body - pos, body, _time_at(direction, pos), start_line)
            )
            pos = body_start + body
    return out


def http_messages(stream: TcpStream) -> list[Message]:
    """HTTP/1.1 requests and responses (and the chunks of chunked bodies), in time order."""
    found = _http_direction(stream.c2s, "c2s") + _http_direction(stream.s2c, "s2c")
    return sorted(found, key=lambda m: (m.ts, m.direction == "s2c", m.offset))


def bursts(stream: TcpStream, *, gap: float = 0.002) -> list[Message]:
    """Runs of segments in one direction, split at a direction change or a pause over ``gap`` s."""
    events = sorted(
        [(c.ts, "c2s", c) for c in stream.c2s.chunks] + [(c.ts, "s2c", c) for c in stream.s2c.chunks],
        key=lambda e: e[0],
    )
    out: list[Message] = []
    for ts, name, chunk in events:
        last = out[-1] if out else None
        if last is not None and last.direction == name and ts - last.ts <= gap:
            grown = last.size + chunk.length
            out[-1] = Message("burst", last.direction, last.offset, grown, grown, last.ts)
        else:
            out.append(Message("burst", name, chunk.offset, chunk.length, chunk.length, ts))  # type: ignore[arg-type]
    return out


def websocket_messages(stream: TcpStream) -> list[Message]:
    """The HTTP upgrade request and response, then every WebSocket message (fragments joined;
    ``size`` counts every frame header, ``payload`` the unmasked bytes), in time order."""
    from threat_model._websocket import read_websocket

    view = read_websocket(stream)
    if view is None:
        return []
    out: list[Message] = []
    names: tuple[DirectionName, ...] = ("c2s", "s2c")
    for name in names:
        direction, frames = stream.direction(name), view.direction(name)
        head = direction.data[: frames.head_end]
        kind: MessageKind = "http-request" if name == "c2s" else "http-response"
        start_line = head.split(b"\r\n", 1)[0].decode("latin-1")
        out.append(Message(kind, name, 0, len(head), 0, _time_at(direction, 0), start_line))
        out += [
            Message("ws-message", name, m.offset, m.size, len(m.data), _time_at(direction, m.offset), m.kind)
            for m in frames.messages
        ]
    return sorted(out, key=lambda m: (m.ts, m.direction == "s2c", m.offset))


def messages(stream: TcpStream) -> list[Message]:
    """TLS records if the client speaks TLS, WebSocket messages after an upgrade, HTTP messages
    if it speaks HTTP/1.1, else bursts."""
    head = stream.c2s.data[:2048]
    if len(head) >= 3 and head[0] == 22 and head[1] == 3:
        return tls_records(stream)
    if found := websocket_messages(stream):
        return found
    if _HTTP_START.match(head):
        return http_messages(stream)
    return bursts(stream)


@dataclass(frozen=True)
class TrafficProfile:
    """Per-direction counts, sizes and inter-arrival times of the observable messages."""

    kind: str
    count: dict[str, int]
    sizes: dict[str, list[int]]
    gaps_s: dict[str, list[float]]
    total_bytes: dict[str, int]


def profile(stream: TcpStream, found: Sequence[Message] | None = None) -> TrafficProfile:
    found = list(found) if found is not None else messages(stream)
    kind = found[0].kind if found else "none"
    sizes: dict[str, list[int]] = {"c2s": [], "s2c": []}
    times: dict[str, list[float]] = {"c2s": [], "s2c": []}
    for message in found:
        if message.kind != "http-chunk":
            sizes[message.direction].append(message.size)
            times[message.direction].append(message.ts)
    return TrafficProfile(
        kind=kind,
        count={k: len(v) for k, v in sizes.items()},
        sizes=sizes,
        gaps_s={k: [b - a for a, b in itertools.pairwise(v)] for k, v in times.items()},
        total_bytes={"c2s": len(stream.c2s.data), "s2c": len(stream.s2c.data)},
    )


@dataclass(frozen=True)
class LengthLeak:
    """How well a linear function of observed sizes predicts a hidden length.

    ``loo_mae`` is the leave-one-out mean absolute error of that prediction, in units of
    the hidden length; ``exact_rate`` the fraction predicted exactly after rounding.
    """

    n: int
    pearson_r: float
    slope: float
    intercept: float
    r2: float
    loo_mae: float
    exact_rate: float

    @property
    def inferable(self) -> bool:
        return self.n >= 3 and self.r2 >= 0.9


def length_leak(sizes: Sequence[float], lengths: Sequence[float]) -> LengthLeak:
    """Fit ``length ≈ slope * size + intercept`` and score it (constant sizes score r = 0)."""
    x = np.asarray(sizes, dtype=np.float64)
    y = np.asarray(lengths, dtype=np.float64)
    if x.shape != y.shape or x.ndim != 1 or len(x) < 2:
        raise ValueError("need two equally long sequences of at least two values")
    if np.ptp(x) == 0 or np.ptp(y) == 0:
        mae = float(np.mean(np.abs(y - y.mean())))
        exact = float(np.mean(np.round(np.full_like(y, y.mean())) == y))
        return LengthLeak(len(x), 0.0, 0.0, float(y.mean()), 0.0, mae, exact)
    slope, intercept = np.polyfit(x, y, 1)
    r = float(np.corrcoef(x, y)[0, 1])
    errors, exact = [], 0
    for i in range(len(x)):
        keep = np.arange(len(x)) != i
        if np.ptp(x[keep]) == 0:
            guess = float(y[keep].mean())
        else:
            a, b = np.polyfit(x[keep], y[keep], 1)
            guess = float(a * x[i] + b)
        errors.append(abs(guess - y[i]))
        exact += round(guess) == y[i]
    return LengthLeak(
        len(x), r, float(slope), float(intercept), r * r, float(np.mean(errors)), exact / len(x)
    )
