"""Peel compression and base64 off captured bytes, so the detectors also see what is inside.

Candidates: zlib streams (a valid two-byte header), gzip members (``1f 8b 08``), raw
deflate at the start of each HTTP body and header value, and runs of base64 / base64url
text. Each candidate is inflated or decoded and searched again, down to ``max_depth``
layers. Output is bounded per candidate and per haystack, so a decompression bomb costs
at most ``max_output`` bytes of work, never a hang.
"""

from __future__ import annotations

import base64
import binascii
import re
import zlib
from collections.abc import Iterator
from dataclasses import dataclass

__all__ = ["Layer", "layers"]

_ZLIB = re.compile(rb"\x78[\x01\x5e\x9c\xda]")
_GZIP = re.compile(rb"\x1f\x8b\x08")
_BASE64 = re.compile(rb"[A-Za-z0-9+/]{24,}={0,2}|[A-Za-z0-9_-]{24,}={0,2}")
_HTTP_STARTS = re.compile(rb"\r\n\r\n|: ")
_MAX_CANDIDATES = 512


@dataclass(frozen=True)
class Layer:
    """Bytes found by decoding the haystack at ``offset`` with ``how`` (e.g. ``zlib>base64``)."""

    how: str
    offset: int
    data: bytes


def _inflate(data: bytes, wbits: int, limit: int) -> bytes | None:
    if limit < 1:  # zlib reads a max_length of 0 as "no limit"
        return None
    decoder = zlib.decompressobj(wbits)
    try:
        out = decoder.decompress(data, limit)
    except zlib.error:
        return None
    return out if len(out) >= 8 else None


def _candidates(data: bytes, limit: int) -> Iterator[tuple[str, int, bytes]]:
    found = 0
    for pattern, wbits, name in ((_ZLIB, 15, "zlib"), (_GZIP, 31, "gzip")):
        for match in pattern.finditer(data):
            if name == "zlib" and int.from_bytes(match.group(), "big") % 31:
                continue
            out = _inflate(data[match.start() :], wbits, limit)
            if out is not None:
                yield name, match.start(), out
            found += 1
            if found >= _MAX_CANDIDATES:
                return
    for match in _HTTP_STARTS.finditer(data):
        out = _inflate(data[match.end() :], -15, limit)
        if out is not None:
            yield "deflate", match.end(), out
        found += 1
        if found >= _MAX_CANDIDATES:
            return
    for match in _BASE64.finditer(data):
        text = match.group()
        try:
            decoded = base64.b64decode(
                text + b"=" * (-len(text) % 4), altchars=b"-_" if b"-" in text or b"_" in text else None
            )
        except (binascii.Error, ValueError):
            continue
        yield "base64", match.start(), decoded[:limit]
        found += 1
        if found >= _MAX_CANDIDATES:
            return


def layers(
    data: bytes, *, max_depth: int = 3, max_output: int = 32 << 20, per_candidate: int = 8 << 20
) -> list[Layer]:
    """Every decodable layer inside ``data``, recursively; offsets are in ``data``'s coordinates."""
    out: list[Layer] = []
    budget = [max_output]

    def walk(blob: bytes, how: str, origin: int | None, depth: int) -> None:
        if depth > max_depth or budget[0] <= 0:
            return
        for name, offset, inner in _candidates(blob, min(per_candidate, budget[0])):
            if budget[0] <= 0:
                return
            budget[0] -= len(inner)
            label = f"{name}>{how}" if how else name
            at = offset if origin is None else origin
            out.append(Layer(label, at, inner))
            walk(inner, label, at, depth + 1)

    walk(data, "", None, 1)
    return out
