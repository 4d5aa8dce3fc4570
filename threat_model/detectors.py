"""Leak detectors run over captured byte streams.

A detector is built from one kind of secret (the prompt, the token ids, the hidden
states the head sent, an output image) and reports :class:`Finding` objects: which
stream, which direction, the byte offset and length, and which encoding of the secret
matched. A finding never carries the secret; its ``preview`` shows at most the first
three bytes of the match.

Plugging in a new secret (a diffusion prompt, latents, an image) means building
another detector; :func:`scan_streams` takes any mix of them.
"""

from __future__ import annotations

import base64
import dataclasses
import json
import re
import urllib.parse
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

from threat_model._capture._reassembly import DirectionName, TcpStream
from threat_model._forms import armoured, float_forms
from threat_model._unpack import layers
from threat_model._websocket import read_websocket
from threat_model._windows import WindowIndex

__all__ = [
    "IN_FRAME",
    "Detector",
    "Finding",
    "HiddenStateDetector",
    "ImageSignatureDetector",
    "Match",
    "PixelDetector",
    "TextLeakDetector",
    "TokenIdDetector",
    "encode_wire",
    "scan_bytes",
    "scan_deep",
    "scan_streams",
]


@dataclass(frozen=True)
class Match:
    """Bytes ``[offset, offset + length)`` of a haystack matched ``variant`` of the secret."""

    variant: str
    offset: int
    length: int
    preview: str


@dataclass(frozen=True)
class Finding:
    detector: str
    variant: str
    stream: int
    direction: str
    offset: int
    length: int
    preview: str

    def __str__(self) -> str:
        return (
            f"{self.detector}/{self.variant}: stream {self.stream} {self.direction} "
            f"bytes {self.offset}..{self.offset + self.length} ({self.preview})"
        )


class Detector(Protocol):
    name: str

    def scan(self, data: bytes) -> list[Match]: ...


def redact(data: bytes) -> str:
    """At most three bytes of a match, then its length: enough to eyeball, not to leak."""
    return f"{data[:3]!r}… ({len(data)} bytes)"


class _IndexedDetector:
    """Shared machinery: labelled needles grouped by window length, one index per length."""

    name = "indexed"

    def __init__(
        self,
        needles: Iterable[tuple[str, bytes, int]],
        *,
        fold_ascii: bool = False,
        max_hits: int = 16,
        stride: int = 1,
    ) -> None:
        groups: dict[int, list[tuple[str, bytes]]] = {}
        for label, data, k in needles:
            groups.setdefault(k, []).append((label, data))
        self._indexes = [
            WindowIndex(items, k, fold_ascii=fold_ascii, stride=min(stride, max(1, k // 4)))
            for k, items in sorted(groups.items())
        ]
        self._max_hits = max_hits
        if not any(len(index) for index in self._indexes):
            raise ValueError(f"{type(self).__name__}: the secret yields no window to search for")

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name!r} ({sum(len(i) for i in self._indexes)} windows)>"

    def scan(self, data: bytes) -> list[Match]:
        matches: list[Match] = []
        for index in self._indexes:
            hits, _ = index.scan(data, max_hits=self._max_hits)
            matches += [
                Match(h.label, h.offset, h.length, redact(data[h.offset : h.offset + h.length])) for h in hits
            ]
        return sorted(matches, key=lambda m: m.offset)


def _text_forms(text: str) -> list[tuple[str, bytes, int]]:
    """(encoding, bytes, bytes per character at least) for one form of a text."""
    forms = [
        ("utf-8", text.encode("utf-8"), 1),
        ("utf-16-le", text.encode("utf-16-le"), 2),
        ("utf-16-be", text.encode("utf-16-be"), 2),
        ("json", json.dumps(text)[1:-1].encode("ascii"), 1),
        ("json-utf8", json.dumps(text, ensure_ascii=False)[1:-1].encode("utf-8"), 1),
        ("url", urllib.parse.quote(text, safe="").encode("ascii"), 1),
        ("url-plus", urllib.parse.quote_plus(text).encode("ascii"), 1),
    ]
    unique: dict[bytes, tuple[str, bytes, int]] = {}
    for name, data, unit in forms:
        unique.setdefault(data, (name, data, unit))
    return list(unique.values())


class TextLeakDetector(_IndexedDetector):
    """Any ``min_chars``-character substring of the secrets, case-folded, in common encodings.

    Encodings: UTF-8, UTF-16-LE/BE, JSON string escapes (``\\uXXXX`` and raw UTF-8),
    URL percent-encoding, and base64 at all three alignments (base64 only catches
    substrings of at least ``ceil(1.5 * min_chars) - 1`` characters). Case folding is ASCII
    folding of haystack and needle alike, plus the lower- and upper-case forms of the secret.
    """

    def __init__(self, secrets: Sequence[str] | str, *, min_chars: int = 8, name: str = "text") -> None:
        if min_chars < 4:
            raise ValueError("min_chars must be at least 4")
        secrets = [secrets] if isinstance(secrets, str) else list(secrets)
        self.name = name
        needles: list[tuple[str, bytes, int]] = []
        for number, secret in enumerate(secrets):
            if len(secret) < 1:
                raise ValueError("empty secret")
            variants = dict.fromkeys((secret, secret.casefold(), secret.lower(), secret.upper()))
            for form in variants:
                for encoding, data, unit in _text_forms(form):
                    needles.append((f"secret{number}:{encoding}", data, min(len(data), unit * min_chars)))
            raw = secret.encode("utf-8")
            k64 = max(4, (3 * min_chars) // 2)
            for shift in range(3):
                piece = base64.b64encode(raw[shift:]).rstrip(b"=")
                needles.append((f"secret{number}:base64", piece[: len(piece) - 3], k64))
                url = base64.urlsafe_b64encode(raw[shift:]).rstrip(b"=")
                if url != piece:
                    needles.append((f"secret{number}:base64url", url[: len(url) - 3], k64))
            for name, text in (("hex", raw.hex()), ("HEX", raw.hex().upper())):
                needles.append((f"secret{number}:{name}", text.encode("ascii"), 2 * min_chars))
        super().__init__([n for n in needles if n[2] >= 4 and len(n[1]) >= n[2]], fold_ascii=True)


class TokenIdDetector(_IndexedDetector):
    """``window`` consecutive token ids (or all, if fewer) packed as int16/32/64 LE/BE or in decimal."""

    def __init__(
        self, sequences: Sequence[Sequence[int]] | Sequence[int], *, window: int = 4, name: str = "token_ids"
    ) -> None:
        if window < 1:
            raise ValueError("window must be positive")
        items: list[Any] = list(sequences)
        if items and isinstance(items[0], (int, np.integer)):
            seqs = [[int(i) for i in items]]
        else:
            seqs = [[int(i) for i in s] for s in items]
        self.name = name
        needles: list[tuple[str, bytes, int]] = []
        for seq in seqs:
            if not seq:
                continue
            count = min(window, len(seq))
            ids = np.asarray(seq, dtype=np.int64)
            formats = [("int32", "i4"), ("int64", "i8")]
            if ids.min() >= 0 and ids.max() < 65536:
                formats.append(("uint16", "u2"))
            for kind, code in formats:
                for order, suffix in (("<", "le"), (">", "be")):
                    data = ids.astype(order + code).tobytes()
                    k = count * int(code[1])
                    needles.append((f"{kind}-{suffix}", data, k))
                    if len(data) >= 9:
                        needles += [
                            (n, t, max(8, (4 * k) // 3))
                            for n, t in armoured(f"{kind}-{suffix}", data, hex_forms=False)
                        ]
            for sep in (", ", ",", " ", "\n"):
                text = sep.join(map(str, seq)).encode("ascii")
                spans = (sep.join(map(str, seq[i : i + count])) for i in range(len(seq) - count + 1))
                shortest = min(len(span) for span in spans)
                if shortest >= 8:
                    needles.append((f"decimal{sep!r}", text, shortest))
                    if len(text) >= 9 + shortest:
                        needles += [
                            (n, t, max(8, (4 * shortest) // 3))
                            for n, t in armoured(f"decimal{sep!r}", text, hex_forms=False)
                        ]
        super().__init__(needles)


def encode_wire(tensor: Any, encoding: str) -> bytes:
    """The payload bytes of ``tensor`` (torch or numpy) in a wire encoding, from the project's own codec."""
    import torch

    from lambda_split.protocol import Encoding, encode_tensor

    return encode_tensor(torch.as_tensor(tensor, dtype=torch.float32), Encoding.parse(encoding))


class HiddenStateDetector(_IndexedDetector):
    """Runs of the encoded tensors (the head's sends, the trunk's replies, latents, an image).

    ``encoding`` is a wire name or a callable returning the bytes the codec produced for
    one tensor, so the detector sees exactly what a plaintext frame would carry. With
    ``widen`` it also looks for fp32, fp16 and bf16 in both byte orders (built with numpy,
    not the codec), and for base64, base64url and hex of each. Only windows at multiples
    of ``stride`` are indexed: a run of ``window + stride - 1`` bytes is always found.
    """

    def __init__(
        self,
        tensors: Iterable[Any],
        encoding: str | Callable[[Any], bytes] = "fp16",
        *,
        window: int = 64,
        name: str = "hidden_states",
        widen: bool = True,
        stride: int = 16,
    ) -> None:
        encode = encoding if callable(encoding) else (lambda t: encode_wire(t, encoding))
        label = encoding if isinstance(encoding, str) else getattr(encoding, "__name__", "custom")
        self.name = name
        needles: list[tuple[str, bytes, int]] = []
        for i, tensor in enumerate(tensors):
            forms = [(label, encode(tensor))] + (float_forms(tensor) if widen else [])
            seen: set[bytes] = set()
            for form, data in forms:
                if len(data) < 8 or data in seen:
                    continue
                seen.add(data)
                k = min(window, len(data))
                needles.append((f"{form}#{i}", data, k))
                if widen and len(data) >= 2 * k:
                    text_k = (4 * k) // 3
                    needles += [
                        (f"{n}#{i}", t, text_k) for n, t in armoured(form, data) if "hex" not in n.lower()
                    ]
                    needles += [(f"{n}#{i}", t, 2 * k) for n, t in armoured(form, data) if "hex" in n.lower()]
        super().__init__(needles, stride=stride)


class PixelDetector(_IndexedDetector):
    """``rows`` consecutive rows of an 8-bit image as RGB, RGBA (alpha 255) or BGR bytes."""

    def __init__(
        self, images: Iterable[Any], *, rows: int = 2, max_window: int = 4096, name: str = "pixels"
    ) -> None:
        self.name = name
        needles: list[tuple[str, bytes, int]] = []
        for i, image in enumerate(images):
            pixels = np.asarray(image)
            if pixels.dtype != np.uint8 or pixels.ndim != 3 or pixels.shape[2] not in (3, 4):
                raise ValueError("images must be uint8 arrays of shape (H, W, 3|4)")
            rgb = pixels[:, :, :3]
            alpha = np.full((*rgb.shape[:2], 1), 255, dtype=np.uint8)
            forms = {"rgb": rgb, "rgba": np.concatenate([rgb, alpha], axis=2), "bgr": rgb[:, :, ::-1]}
            if pixels.shape[2] == 4:
                forms["rgba"] = pixels
            for form, array in forms.items():
                data = np.ascontiguousarray(array).tobytes()
                k = min(len(data), max(16, min(max_window, rows * array.shape[1] * array.shape[2])))
                needles.append((f"{form}#{i}", data, k))
        super().__init__(needles)


@dataclass
class ImageSignatureDetector:
    """Encoded images by signature: PNG, JPEG (JFIF, Exif, Adobe, bare DQT), WebP, GIF."""

    name: str = "image_signature"
    _pattern: re.Pattern[bytes] = field(
        default=re.compile(
            rb"(?P<png>\x89PNG\r\n\x1a\n)"
            rb"|(?P<jpeg>\xff\xd8\xff(?:\xe0..JFIF\x00|\xe1..Exif\x00|\xee..Adobe|\xdb\x00[\x43\x84]))"
            rb"|(?P<webp>RIFF....WEBP)|(?P<gif>GIF8[79]a)",
            re.DOTALL,
        ),
        repr=False,
    )

    def scan(self, data: bytes) -> list[Match]:
        found = [
            Match(str(m.lastgroup), m.start(), m.end() - m.start(), redact(m.group()))
            for m in self._pattern.finditer(data)
        ]
        for kind, text in _ARMOURED_SIGNATURES:
            start = data.find(text)
            while start >= 0:
                found.append(Match(kind, start, len(text), redact(text)))
                start = data.find(text, start + 1)
        return sorted(found, key=lambda m: m.offset)


# The signatures as a base64 (or base64url) encoder writes them at the start of its input,
# e.g. in a data: URL or a JSON string: ``iVBORw0KGgo`` for PNG, ``/9j/`` + marker for JPEG.
_ARMOURED_SIGNATURES = [
    (f"{kind}/{name}", text.rstrip(b"="))
    for kind, magic in (
        ("png", b"\x89PNG\r\n\x1a\n"),
        ("jpeg", b"\xff\xd8\xff\xe0"),
        ("jpeg", b"\xff\xd8\xff\xdb"),
        ("jpeg", b"\xff\xd8\xff\xe1"),
        ("gif", b"GIF89a"),
        ("gif", b"GIF87a"),
    )
    for name, text in (("base64", base64.b64encode(magic)), ("base64url", base64.urlsafe_b64encode(magic)))
]


def scan_bytes(
    detectors: Iterable[Detector], data: bytes, *, stream: int = 0, direction: str = "c2s"
) -> list[Finding]:
    return [
        Finding(d.name, m.variant, stream, direction, m.offset, m.length, m.preview)
        for d in detectors
        for m in d.scan(data)
    ]


def scan_deep(
    detectors: Iterable[Detector], data: bytes, *, stream: int = 0, direction: str = "c2s"
) -> list[Finding]:
    """:func:`scan_bytes` over ``data`` and over every zlib/gzip/deflate/base64 layer inside it."""
    detectors = list(detectors)
    findings = scan_bytes(detectors, data, stream=stream, direction=direction)
    for layer in layers(data):
        for found in scan_bytes(detectors, layer.data, stream=stream, direction=direction):
            variant = f"{found.variant} in {layer.how}"
            findings.append(dataclasses.replace(found, variant=variant, offset=layer.offset))
    return findings


IN_FRAME = " in a WebSocket frame"  # the suffix of a finding read from an unmasked frame payload


def scan_streams(detectors: Iterable[Detector], streams: Sequence[TcpStream]) -> list[Finding]:
    """Run every detector over both directions of every stream, and inside what they encode.

    A WebSocket connection is read as an observer reads it (:mod:`threat_model._websocket`): its
    HTTP heads, then each frame's payload unmasked (the masking key travels in the clear), then
    raw bytes from wherever the framing stops making sense. Findings inside a frame say so and
    carry the wire offset of the frame's payload.
    """
    detectors = list(detectors)
    findings: list[Finding] = []
    for number, stream in enumerate(streams):
        view = read_websocket(stream)
        names: tuple[DirectionName, ...] = ("c2s", "s2c")
        for direction in names:
            data = stream.c2s.data if direction == "c2s" else stream.s2c.data
            if view is None:
                findings += scan_deep(detectors, data, stream=number, direction=direction)
                continue
            frames = view.direction(direction)
            for at, span in frames.spans(data):
                found = scan_deep(detectors, span, stream=number, direction=direction)
                if at >= frames.head_end and at != frames.unparsed:
                    found = [dataclasses.replace(f, variant=f"{f.variant}{IN_FRAME}") for f in found]
                findings += [dataclasses.replace(f, offset=at + f.offset) for f in found]
    return findings
