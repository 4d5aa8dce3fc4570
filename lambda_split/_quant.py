"""Blockwise absmax quantisation as the wire carries it: INT8, INT4 and INT2 (see :mod:`._codec`).

One quantiser serves the codec and the ``quant:`` defences (:mod:`._defences`), so a defended
state computed on the device equals, value for value, what the trunk decodes from the wire.

For each block of :data:`BLOCK` values, ``scale = max|x| / L`` (``L`` = 127, 7 or 1) is stored
as an IEEE fp16 number *rounded up*, so ``|x| / scale <= L`` holds for every value and no level
is clipped; ``q = round(x / scale)`` in ``-L..L``; a value decodes as ``q * scale`` (fp32).
A block whose absmax is below fp16's smallest subnormal (6e-8) gets that subnormal as its
scale (its values decode to within 3e-8 of themselves); a block whose scale would exceed fp16's
largest finite value (absmax above about ``65504 * L``) is refused with ValueError, never
carried as Inf. (An fp16 wire refuses any value above 65504 in the same way.)
"""

from __future__ import annotations

import math

import numpy as np
import torch

BLOCK = 64
#: Levels per side of each encoding: values are integers in -L..L.
LEVELS = {"int8": 127, "int4": 7, "int2": 1}
#: Values per payload byte of the packed encodings (INT8 is one signed byte per value).
PER_BYTE = {"int8": 1, "int4": 2, "int2": 4}
_TINY = np.float16(2.0**-24)
_FP16_MAX = float(np.finfo(np.float16).max)


def scales_fp16(absmax: torch.Tensor, levels: int) -> torch.Tensor:
    """The fp16 scale of each block (as fp32 values): ``absmax / levels`` rounded up to fp16."""
    exact = absmax.to(torch.float32).numpy().astype(np.float64) / levels  # exact enough to round up
    if exact.size and float(exact.max()) > _FP16_MAX:
        raise ValueError(f"a value of magnitude {float(absmax.max()):.3g} is too large for the int wire")
    half = exact.astype(np.float16)
    with np.errstate(over="ignore"):  # 65504's successor is computed (inf) but never chosen
        half = np.where(half.astype(np.float64) < exact, np.nextafter(half, np.float16(np.inf)), half)
    half = np.maximum(half, _TINY)
    return torch.from_numpy(half.astype(np.float32))


def quantise(blocks: torch.Tensor, levels: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(scale (..., 1) fp32 holding fp16 values, q (..., BLOCK) int8 in -levels..levels)``."""
    absmax = blocks.abs().amax(dim=-1, keepdim=True)
    scale = scales_fp16(absmax, levels)
    q = torch.round(blocks / scale).clamp_(-levels, levels).to(torch.int8)
    return scale, q


def _blocks(flat: torch.Tensor) -> torch.Tensor:
    count = flat.numel()
    padded = torch.zeros(math.ceil(count / BLOCK) * BLOCK, dtype=torch.float32)
    padded[:count] = flat
    return padded.view(-1, BLOCK)  # (nblocks, 64)


def blocks_payload_size(name: str, count: int) -> int:
    """Bytes of ``count`` values in encoding ``name`` (int8, int4, int2): fp16 scales, then values."""
    return 2 * math.ceil(count / BLOCK) + math.ceil(count / PER_BYTE[name])


def encode_blocks(flat: torch.Tensor, name: str) -> bytes:
    """The payload of a flat fp32 tensor: all block scales (fp16), then the values (packed)."""
    count = flat.numel()
    scale, q = quantise(_blocks(flat), LEVELS[name])
    head = scale.view(-1).numpy().astype("<f2").tobytes()
    values = q.view(-1)[:count].numpy()
    if name == "int8":
        return head + values.tobytes()
    per = PER_BYTE[name]
    bits = 8 // per
    flat_codes = np.zeros(math.ceil(count / per) * per, dtype=np.uint8)
    flat_codes[:count] = values.astype(np.int16) + LEVELS[name]  # offset binary: 0..2L
    codes = flat_codes.reshape(-1, per)
    packed = np.zeros(codes.shape[0], dtype=np.uint8)
    for slot in range(per):  # value i sits in byte i // per, bits (i % per) * bits upward
        packed |= codes[:, slot] << np.uint8(slot * bits)
    return head + packed.tobytes()


def decode_blocks(payload: memoryview, count: int, name: str) -> torch.Tensor:
    """Values of a payload of the right length (checked by the caller); ValueError if malformed:
    a scale that is negative, not finite, or a code outside ``0..2L`` or in the padding."""
    blocks = math.ceil(count / BLOCK)
    scales = np.frombuffer(payload, dtype="<f2", count=blocks).astype(np.float32)
    if not np.all(np.isfinite(scales)) or np.any(scales < 0):
        raise ValueError(f"{name} block scales must be finite and non-negative")
    levels = LEVELS[name]
    if name == "int8":
        q = np.frombuffer(payload, dtype=np.int8, count=count, offset=2 * blocks).astype(np.float32)
        if count and float(np.abs(q).max()) > levels:
            raise ValueError("int8 values must lie in -127..127")
    else:
        per = PER_BYTE[name]
        bits = 8 // per
        packed = np.frombuffer(payload, dtype=np.uint8, offset=2 * blocks)
        codes = np.stack([(packed >> np.uint8(s * bits)) & np.uint8((1 << bits) - 1) for s in range(per)], 1)
        codes = codes.reshape(-1)
        if np.any(codes[count:]):
            raise ValueError(f"{name} padding bits must be zero")
        codes = codes[:count]
        if count and int(codes.max()) > 2 * levels:
            raise ValueError(f"{name} codes must lie in 0..{2 * levels}")
        q = codes.astype(np.float32) - levels
    padded = np.zeros(blocks * BLOCK, dtype=np.float32)
    padded[:count] = q
    values = padded.reshape(blocks, BLOCK) * scales[:, None]
    return torch.from_numpy(values.reshape(-1)[:count].copy())
