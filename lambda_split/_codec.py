"""The tensor frame: the only binary format that crosses the wire.

A frame is a versioned bundle of named tensors plus the session id and a sequence
number. Everything is little-endian. No pickle, no ``torch.load``::

    header (32 bytes)
      0   4  magic            b"\\x89LSF"
      4   1  version          1
      5   1  kind             FrameKind
      6   1  tensor count     1 .. limits.max_tensors
      7   1  flags            0 (reserved)
      8  16  session id       opaque bytes, chosen by the server
     24   8  sequence number  u64, strictly increasing per session and direction
    then, per tensor
      1        name length n (1..32), then n bytes of ASCII [a-z0-9_]
      1        encoding        Encoding
      1        rank r          1 .. limits.max_rank
      4*r      dims            u32 each, every dim >= 1
      8        payload length  u64; must equal what the dims and encoding imply
      payload

Encodings. ``INT8`` is blockwise absmax quantisation over the flattened tensor:
for each block of 64 values, ``scale = max|x| / 127`` (fp32) and
``q = round(x / scale)``. The payload is all scales, then all int8 values.
Block size 64 divides the hidden sizes of every model family we target (576, 2048,
4096, 8192) and the latent widths of SD/SDXL, so a block never straddles two token
rows; it is small enough that the outlier channels of LLM activations spoil only
their own block, and the fp32 scale costs 4/64 = 6.25 % over raw int8.

Any malformed input raises :class:`FrameError`, and nothing is returned.
"""

from __future__ import annotations

import enum
import math
import re
import struct
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import torch

MAGIC = b"\x89LSF"
VERSION = 1
INT8_BLOCK = 64
_HEADER = struct.Struct("<4sBBBB16sQ")
_NAME = re.compile(rb"[a-z0-9_]{1,32}\Z")
SESSION_ID_BYTES = 16


class FrameError(ValueError):
    """The bytes are not a well-formed frame within the limits. Nothing was decoded."""


class Encoding(enum.IntEnum):
    FP32 = 1
    FP16 = 2
    BF16 = 3
    INT8 = 4
    U8 = 5

    @classmethod
    def parse(cls, name: str) -> Encoding:
        """Map a wire name (``fp32``, ``fp16``, ``bf16``, ``int8``) to an encoding."""
        try:
            encoding = cls[name.upper()]
        except KeyError:
            raise ValueError(f"unknown wire encoding {name!r}; choose fp32, fp16, bf16 or int8") from None
        if encoding is cls.U8:
            raise ValueError("u8 is for masks, not a wire encoding for hidden states")
        return encoding

    @property
    def wire_name(self) -> str:
        return self.name.lower()


WIRE_ENCODINGS = ("fp32", "fp16", "bf16", "int8")


class FrameKind(enum.IntEnum):
    LLM_STEP = 1
    LLM_RESULT = 2
    DIFFUSION_CONTEXT = 3
    DIFFUSION_STEP = 4
    DIFFUSION_RESULT = 5
    #: Latents on the server (lambda_split.diffusion._loop): the first step carries the prompt
    #: context, the initial noise and the scheduler; each later step only its index.
    DIFFUSION_BEGIN = 6
    DIFFUSION_ADVANCE = 7


@dataclass(frozen=True)
class FrameLimits:
    """Hard limits checked before any allocation."""

    max_bytes: int = 64 * 1024 * 1024
    max_tensors: int = 8
    max_rank: int = 4
    max_elements: int = 16 * 1024 * 1024

    def __post_init__(self) -> None:
        for name in ("max_bytes", "max_tensors", "max_rank", "max_elements"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be positive")
        if self.max_tensors > 255 or self.max_rank > 255:
            raise ValueError("max_tensors and max_rank must fit in one byte")


DEFAULT_LIMITS = FrameLimits()


@dataclass(frozen=True)
class Frame:
    kind: FrameKind
    session_id: bytes
    seq: int
    tensors: Mapping[str, torch.Tensor]
    encodings: Mapping[str, Encoding]

    def tensor(self, name: str, *, rank: int | None = None) -> torch.Tensor:
        """Return tensor ``name``, raising FrameError if it is absent or has the wrong rank."""
        if name not in self.tensors:
            raise FrameError(f"frame has no tensor {name!r}")
        value = self.tensors[name]
        if rank is not None and value.dim() != rank:
            raise FrameError(f"tensor {name!r} must have rank {rank}, got {value.dim()}")
        return value


def _payload_size(encoding: Encoding, count: int) -> int:
    if encoding is Encoding.FP32:
        return 4 * count
    if encoding in (Encoding.FP16, Encoding.BF16):
        return 2 * count
    if encoding is Encoding.INT8:
        return 4 * math.ceil(count / INT8_BLOCK) + count
    return count  # U8


def _quantize_int8(flat: torch.Tensor) -> bytes:
    count = flat.numel()
    blocks = math.ceil(count / INT8_BLOCK)
    padded = torch.zeros(blocks * INT8_BLOCK, dtype=torch.float32)
    padded[:count] = flat
    padded = padded.view(blocks, INT8_BLOCK)  # (nblocks, 64)
    scales = padded.abs().amax(dim=1) / 127.0  # (nblocks,)
    safe = torch.where(scales > 0, scales, torch.ones_like(scales))
    q = torch.round(padded / safe[:, None]).clamp_(-127, 127).to(torch.int8)
    return scales.numpy().astype("<f4").tobytes() + q.view(-1)[:count].numpy().tobytes()


def _dequantize_int8(payload: memoryview, count: int) -> torch.Tensor:
    blocks = math.ceil(count / INT8_BLOCK)
    scales = np.frombuffer(payload, dtype="<f4", count=blocks)
    if not np.all(np.isfinite(scales)) or np.any(scales < 0):
        raise FrameError("int8 block scales must be finite and non-negative")
    q = np.frombuffer(payload, dtype=np.int8, count=count, offset=4 * blocks).astype(np.float32)
    padded = np.zeros(blocks * INT8_BLOCK, dtype=np.float32)
    padded[:count] = q
    values = padded.reshape(blocks, INT8_BLOCK) * scales[:, None]
    return torch.from_numpy(values.reshape(-1)[:count].copy())


def encode_tensor(tensor: torch.Tensor, encoding: Encoding) -> bytes:
    """Return the payload bytes of one tensor in ``encoding`` (also used by the leak detectors)."""
    flat = tensor.detach().to("cpu").contiguous().view(-1)
    if encoding is Encoding.U8:
        if flat.dtype not in (torch.bool, torch.uint8):
            raise TypeError("U8 encoding takes bool or uint8 tensors")
        return flat.to(torch.uint8).numpy().tobytes()
    if not flat.dtype.is_floating_point:
        raise TypeError(f"{encoding.wire_name} encoding takes floating-point tensors, got {flat.dtype}")
    flat = flat.to(torch.float32)
    if not torch.isfinite(flat).all():
        raise ValueError("refusing to encode a tensor with NaN or Inf")
    if encoding is Encoding.FP32:
        return flat.numpy().astype("<f4").tobytes()
    if encoding is Encoding.FP16:
        return flat.to(torch.float16).numpy().astype("<f2").tobytes()
    if encoding is Encoding.BF16:
        return flat.to(torch.bfloat16).view(torch.int16).numpy().astype("<i2").tobytes()
    return _quantize_int8(flat)


def wire_roundtrip(tensor: torch.Tensor, encoding: Encoding) -> torch.Tensor:
    """``tensor`` as the other side decodes it after it crossed in ``encoding`` (fp32, same shape)."""
    shape = tuple(tensor.shape)
    return _decode_tensor(memoryview(encode_tensor(tensor, encoding)), encoding, shape)


def _decode_tensor(payload: memoryview, encoding: Encoding, shape: tuple[int, ...]) -> torch.Tensor:
    count = math.prod(shape)
    if encoding is Encoding.U8:
        values = np.frombuffer(payload, dtype=np.uint8, count=count).copy()
        return torch.from_numpy(values).view(shape)
    if encoding is Encoding.FP32:
        tensor = torch.from_numpy(np.frombuffer(payload, dtype="<f4", count=count).astype(np.float32))
    elif encoding is Encoding.FP16:
        tensor = torch.from_numpy(np.frombuffer(payload, dtype="<f2", count=count).astype(np.float32))
    elif encoding is Encoding.BF16:
        raw = np.frombuffer(payload, dtype="<i2", count=count).astype(np.int16)
        tensor = torch.from_numpy(raw).view(torch.bfloat16).to(torch.float32)
    else:
        tensor = _dequantize_int8(payload, count)
    if not torch.isfinite(tensor).all():
        raise FrameError("tensor contains NaN or Inf")
    return tensor.view(shape)


def encode_frame(
    kind: FrameKind,
    session_id: bytes,
    seq: int,
    tensors: Mapping[str, tuple[torch.Tensor, Encoding]],
    limits: FrameLimits = DEFAULT_LIMITS,
) -> bytes:
    """Serialise named tensors, each with its encoding, into one frame.

    Raises ValueError or TypeError for input the decoder would refuse, so a frame that
    encodes is a frame that decodes.
    """
    if len(session_id) != SESSION_ID_BYTES:
        raise ValueError(f"session id must be {SESSION_ID_BYTES} bytes")
    if not 0 <= seq < 2**64:
        raise ValueError("sequence number out of range")
    if not 1 <= len(tensors) <= limits.max_tensors:
        raise ValueError(f"a frame carries 1..{limits.max_tensors} tensors")
    parts = [_HEADER.pack(MAGIC, VERSION, int(kind), len(tensors), 0, session_id, seq)]
    for name, (tensor, encoding) in tensors.items():
        raw_name = name.encode("ascii")
        if not _NAME.match(raw_name):
            raise ValueError(f"bad tensor name {name!r}")
        shape = tuple(tensor.shape)
        if not 1 <= len(shape) <= limits.max_rank or min(shape) < 1:
            raise ValueError(f"tensor {name!r} has unsupported shape {shape}")
        if math.prod(shape) > limits.max_elements:
            raise ValueError(f"tensor {name!r} has more than {limits.max_elements} elements")
        payload = encode_tensor(tensor, encoding)
        parts.append(struct.pack("<B", len(raw_name)) + raw_name)
        parts.append(struct.pack(f"<BB{len(shape)}IQ", int(encoding), len(shape), *shape, len(payload)))
        parts.append(payload)
    frame = b"".join(parts)
    if len(frame) > limits.max_bytes:
        raise ValueError(f"frame of {len(frame)} bytes exceeds the {limits.max_bytes}-byte limit")
    return frame


class _Reader:
    def __init__(self, data: bytes) -> None:
        self.view = memoryview(data)
        self.pos = 0

    def take(self, size: int) -> memoryview:
        if size > len(self.view) - self.pos:
            raise FrameError("frame is truncated")
        chunk = self.view[self.pos : self.pos + size]
        self.pos += size
        return chunk

    def unpack(self, fmt: str) -> tuple[int, ...]:
        layout = struct.Struct(fmt)
        return layout.unpack(self.take(layout.size))


def decode_frame(data: bytes, limits: FrameLimits = DEFAULT_LIMITS) -> Frame:
    """Parse and check a frame. Raises FrameError on anything malformed or over a limit."""
    if not isinstance(data, (bytes, bytearray)):
        raise FrameError("frame must be bytes")
    if len(data) > limits.max_bytes:
        raise FrameError(f"frame exceeds the {limits.max_bytes}-byte limit")
    reader = _Reader(bytes(data))
    magic, version, kind, count, flags, session_id, seq = _HEADER.unpack(reader.take(_HEADER.size))
    if magic != MAGIC:
        raise FrameError("not a Λ-Split frame (bad magic)")
    if version != VERSION:
        raise FrameError(f"unsupported frame version {version}; this side speaks {VERSION}")
    if kind not in FrameKind._value2member_map_:
        raise FrameError(f"unknown frame kind {kind}")
    if flags != 0:
        raise FrameError("reserved flags must be zero")
    if not 1 <= count <= limits.max_tensors:
        raise FrameError(f"a frame carries 1..{limits.max_tensors} tensors")
    tensors: dict[str, torch.Tensor] = {}
    encodings: dict[str, Encoding] = {}
    for _ in range(count):
        (name_len,) = reader.unpack("<B")
        raw_name = bytes(reader.take(name_len))
        if not _NAME.match(raw_name):
            raise FrameError("bad tensor name")
        name = raw_name.decode("ascii")
        if name in tensors:
            raise FrameError(f"duplicate tensor {name!r}")
        encoding_id, rank = reader.unpack("<BB")
        if encoding_id not in Encoding._value2member_map_:
            raise FrameError(f"unknown encoding {encoding_id}")
        if not 1 <= rank <= limits.max_rank:
            raise FrameError(f"rank {rank} outside 1..{limits.max_rank}")
        shape = reader.unpack(f"<{rank}I")
        (payload_len,) = reader.unpack("<Q")
        if min(shape) < 1:
            raise FrameError("every dimension must be at least 1")
        elements = math.prod(shape)
        if elements > limits.max_elements:
            raise FrameError(f"tensor {name!r} has more than {limits.max_elements} elements")
        encoding = Encoding(encoding_id)
        if payload_len != _payload_size(encoding, elements):
            raise FrameError(f"tensor {name!r}: payload length does not match its shape and encoding")
        tensors[name] = _decode_tensor(reader.take(payload_len), encoding, shape)
        encodings[name] = encoding
    if reader.pos != len(data):
        raise FrameError("trailing bytes after the last tensor")
    return Frame(FrameKind(kind), session_id, seq, tensors, encodings)
