"""The encodings a secret may take on the wire: float formats, byte orders and text armour.

Built with numpy and the standard library, independently of the project's own codec, so
that a codec change (a byte order, a rounding) cannot make the detectors agree with it
by construction.
"""

from __future__ import annotations

import base64
import binascii
from typing import Any

import numpy as np

__all__ = ["armoured", "float_forms"]


def _floats(tensor: Any) -> np.ndarray:
    if hasattr(tensor, "detach"):
        tensor = tensor.detach().to("cpu").float().numpy()
    return np.ascontiguousarray(np.asarray(tensor, dtype=np.float32).reshape(-1))


def _bf16_bits(values: np.ndarray) -> np.ndarray:
    """bfloat16 bit patterns by round-to-nearest-even of the float32 bits (what torch does)."""
    bits = values.view(np.uint32).astype(np.uint64)
    rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
    return rounded.astype(np.uint16)


def float_forms(tensor: Any) -> list[tuple[str, bytes]]:
    """``tensor`` as fp32, fp16 and bf16, little- and big-endian: (name, bytes)."""
    values = _floats(tensor)
    half = values.astype(np.float16)
    brain = _bf16_bits(values)
    return [
        ("fp32-le", values.astype("<f4").tobytes()),
        ("fp32-be", values.astype(">f4").tobytes()),
        ("fp16-le", half.astype("<f2").tobytes()),
        ("fp16-be", half.astype(">f2").tobytes()),
        ("bf16-le", brain.astype("<u2").tobytes()),
        ("bf16-be", brain.astype(">u2").tobytes()),
    ]


def armoured(name: str, data: bytes, *, hex_forms: bool = True) -> list[tuple[str, bytes]]:
    """Text armour of ``data``: base64 and base64url at each of the three byte alignments, and hex.

    A base64 encoder groups bytes in threes from wherever its input started, so the secret's
    bytes appear under one of three alignments; the partial group at each end is cut off.
    """
    out: list[tuple[str, bytes]] = []
    for shift in range(3):
        body = data[shift:]
        body = body[: len(body) - len(body) % 3]
        if len(body) < 6:
            continue
        text = base64.b64encode(body)
        out.append((f"{name}/base64", text))
        if b"+" in text or b"/" in text:
            out.append((f"{name}/base64url", base64.urlsafe_b64encode(body)))
    if hex_forms:
        text = binascii.hexlify(data)
        out += [(f"{name}/hex", text), (f"{name}/HEX", text.upper())]
    return out
