"""The tensor frame: the only binary format that crosses the wire.

A frame is a versioned bundle of named tensors plus a sequence number and, where the transport
does not already bind the session, the session id. Everything is little-endian. No pickle, no
``torch.load``::

    header (5 .. 30 bytes)
      0   1  version          3
      1   1  kind             FrameKind
      2   1  tensor count     1 .. limits.max_tensors
      3   1  flags            bit 0: a session id follows; the other bits are 0
      4  16  session id       opaque bytes chosen by the server (only with flag bit 0)
      .. 1-10 sequence number  varint (u64), strictly increasing per session and direction
    then, per tensor
      1        name byte b: 1 .. 32 = a literal name of b bytes of ASCII [a-z0-9_] follows;
               0x80 | i = name i of :data:`STATIC_NAMES` (nothing follows); any other value is refused
      1        encoding        Encoding
      1        rank r          1 .. limits.max_rank
      r varints dims           each 1 .. 2**32 - 1
      payload                  exactly the length the dims and encoding imply (no length field)

Tensor names. The names the protocol's own frames carry are in a fixed static table,
:data:`STATIC_NAMES` (like HPACK's), and cost one byte; its order is part of the format, so
entries are only ever appended (up to 128), never reordered or removed. Every frame has exactly one
encoding: the encoder always uses the table for a name in it, and the decoder refuses a literal
spelling of a table name and an index past the table's end. Receipts rely on that, since they
hash frame bytes (:mod:`lambda_split._receipts`).

A decode step of SmolLM2 (hidden 576, fp16, no mask, sequence number below 128) therefore costs
5 bytes of frame header and 7 of tensor header (name 1, encoding 1, rank 1, dims 1 + 1 + 2),
in either direction; a result with a receipt adds its record, 4 bytes plus the 70-72-byte signature.

A varint is unsigned LEB128: seven bits per byte, least significant first, the top bit set on
every byte but the last; only the shortest form is accepted (no trailing 0x80 … 0x00 padding).

Where the session id goes. Over HTTP a step's URL names the session, over the stream a one-byte
handle does (``lambda_split.protocol``, ``BOUND_STEP``), so the client's frames leave it out and
the server's result frames do the same as the step they answer. A frame that carries an id anyway
must name the session its transport names. Receipts bind the session id and the sequence number in
their hash chain separately (``lambda_split._receipts``), so leaving it out weakens nothing.

Encodings. ``INT8``, ``INT4`` and ``INT2`` are blockwise absmax quantisation over the flattened
tensor (:mod:`._quant`): per block of 64 values an fp16 scale ``max|x| / L`` (rounded up;
``L`` = 127, 7, 1), then the values in ``-L..L``: INT8 one signed byte each, INT4 two per byte
and INT2 four per byte as ``q + L`` (offset binary; the first value in the low bits; codes above
``2L`` and non-zero padding bits are refused). The payload is all scales, then all values.
Block size 64 divides the hidden sizes of every model family we target (576, 2048, 4096, 8192)
and the latent widths of SD/SDXL, so a block never straddles two token rows; it is small enough
that the outlier channels of LLM activations spoil only their own block, and the fp16 scale costs
2/64 = 3.1 % over raw int8. INT4 and INT2 cross the uplink only (``--defence quant:int4|int2``);
a session's ``wire`` (its downlink) is one of :data:`WIRE_ENCODINGS`.

Versions 1 and 2 are refused. Both began with the 4-byte magic ``b"\\x89LSF"`` and a version byte
(version 1: a 32-byte header with a mandatory session id and u64 sequence number, a u64 payload
length per tensor, fp32 int8 scales; version 2: the version 3 layout behind the magic, tensor
names always spelled out); a frame that starts with that magic is refused with a message naming
the change, and any frame whose first byte is not 3 as an unsupported version. Protocol version 3
(``/v1/info``) announces the change, so a client and a server of different versions part with a
clear error before any frame is sent.

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

from lambda_split import _quant

VERSION = 3
#: how frames of versions 1 and 2 began; only to recognise and refuse them
OLD_MAGIC = b"\x89LSF"
INT8_BLOCK = _quant.BLOCK
_HEADER = struct.Struct("<BBBB")
#: offset of the tensor count in the header (lambda_split._receipts appends and cuts a tensor)
COUNT_OFFSET = 2
#: names of one byte on the wire, ``0x80 | index``; append only (see the module docstring)
STATIC_NAMES = (
    "hidden",
    "mask",
    "receipt",
    "encoder_hidden_states",
    "text_embeds",
    "time_ids",
    "latents",
    "timestep",
    "noise_pred",
    "noise",
    "params",
    "scheduler",
    "generator",
    "step",
    "input_digest",
)
_STATIC_INDEX = {name: index for index, name in enumerate(STATIC_NAMES)}
_STATIC_FLAG = 0x80
_MAX_NAME = 32
_NAME = re.compile(rb"[a-z0-9_]{1,32}\Z")
SESSION_ID_BYTES = 16
FLAG_SESSION_ID = 0x01
_MAX_DIM = 2**32 - 1


class FrameError(ValueError):
    """The bytes are not a well-formed frame within the limits. Nothing was decoded."""


class Encoding(enum.IntEnum):
    FP32 = 1
    FP16 = 2
    BF16 = 3
    INT8 = 4
    U8 = 5
    INT4 = 6
    INT2 = 7

    @classmethod
    def parse(cls, name: str) -> Encoding:
        """Map a wire name (``fp32``, ``fp16``, ``bf16``, ``int8``) to an encoding."""
        try:
            encoding = cls[name.upper()]
        except KeyError:
            raise ValueError(f"unknown wire encoding {name!r}; choose fp32, fp16, bf16 or int8") from None
        if encoding is cls.U8:
            raise ValueError("u8 is for masks, not a wire encoding for hidden states")
        if encoding in (cls.INT4, cls.INT2):
            raise ValueError(
                f"{name} crosses the uplink only (--defence quant:{name}); choose fp32, fp16, bf16 or int8"
            )
        return encoding

    @property
    def quantised(self) -> bool:
        """INT8, INT4 or INT2: blockwise absmax quantisation (:mod:`._quant`)."""
        return self in (Encoding.INT8, Encoding.INT4, Encoding.INT2)

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
    #: None when the frame left it to the transport (see the module docstring)
    session_id: bytes | None
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
    if encoding.quantised:
        return _quant.blocks_payload_size(encoding.wire_name, count)
    return count  # U8


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
    if not np.isfinite(flat.numpy()).all():  # numpy's check: a fraction of torch's per-call cost
        raise ValueError("refusing to encode a tensor with NaN or Inf")
    if encoding is Encoding.FP32:
        return flat.numpy().astype("<f4", copy=False).tobytes()
    if encoding is Encoding.FP16:
        return flat.to(torch.float16).numpy().astype("<f2", copy=False).tobytes()
    if encoding is Encoding.BF16:
        return flat.to(torch.bfloat16).view(torch.int16).numpy().astype("<i2").tobytes()
    return _quant.encode_blocks(flat, encoding.wire_name)


def wire_roundtrip(tensor: torch.Tensor, encoding: Encoding) -> torch.Tensor:
    """``tensor`` as the other side decodes it after it crossed in ``encoding`` (fp32, same shape)."""
    shape = tuple(tensor.shape)
    return _decode_tensor(memoryview(encode_tensor(tensor, encoding)), encoding, shape)


def _decode_tensor(payload: memoryview, encoding: Encoding, shape: tuple[int, ...]) -> torch.Tensor:
    count = math.prod(shape)
    if encoding is Encoding.U8:
        values = np.frombuffer(payload, dtype=np.uint8, count=count).copy()
        return torch.from_numpy(values).view(shape)
    if encoding in (Encoding.FP32, Encoding.FP16):
        wire = "<f4" if encoding is Encoding.FP32 else "<f2"
        floats = np.frombuffer(payload, dtype=wire, count=count).astype(np.float32)  # a copy: writable
        if not np.isfinite(floats).all():
            raise FrameError("tensor contains NaN or Inf")
        return torch.from_numpy(floats).view(shape)
    if encoding is Encoding.BF16:
        raw = np.frombuffer(payload, dtype="<i2", count=count).astype(np.int16)
        tensor = torch.from_numpy(raw).view(torch.bfloat16).to(torch.float32)
    else:
        try:
            tensor = _quant.decode_blocks(payload, count, encoding.wire_name)
        except ValueError as exc:
            raise FrameError(str(exc)) from None
    if not torch.isfinite(tensor).all():
        raise FrameError("tensor contains NaN or Inf")
    return tensor.view(shape)


def _varint(value: int) -> bytes:
    out = bytearray()
    while value >= 0x80:
        out.append(value & 0x7F | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _name_bytes(name: str) -> bytes:
    """The name as a frame carries it: one byte for a name of :data:`STATIC_NAMES`, else its length
    and its ASCII bytes."""
    index = _STATIC_INDEX.get(name)
    if index is not None:
        return bytes((_STATIC_FLAG | index,))
    raw_name = name.encode("ascii")
    return bytes((len(raw_name),)) + raw_name


def tensor_record(name: str, encoding: Encoding, shape: tuple[int, ...], payload: bytes) -> bytes:
    """One tensor as a frame carries it (name, encoding, rank, dims, payload); no checks."""
    dims = b"".join(_varint(d) for d in shape)
    return _name_bytes(name) + bytes((int(encoding), len(shape))) + dims + payload


def encode_frame(
    kind: FrameKind,
    session_id: bytes | None,
    seq: int,
    tensors: Mapping[str, tuple[torch.Tensor, Encoding]],
    limits: FrameLimits = DEFAULT_LIMITS,
) -> bytes:
    """Serialise named tensors, each with its encoding, into one frame; ``session_id`` None leaves
    the session to the transport (see the module docstring).

    Raises ValueError or TypeError for input the decoder would refuse, so a frame that
    encodes is a frame that decodes.
    """
    if session_id is not None and len(session_id) != SESSION_ID_BYTES:
        raise ValueError(f"session id must be {SESSION_ID_BYTES} bytes")
    if not 0 <= seq < 2**64:
        raise ValueError("sequence number out of range")
    if not 1 <= len(tensors) <= limits.max_tensors:
        raise ValueError(f"a frame carries 1..{limits.max_tensors} tensors")
    flags = 0 if session_id is None else FLAG_SESSION_ID
    parts = [_HEADER.pack(VERSION, int(kind), len(tensors), flags), session_id or b"", _varint(seq)]
    for name, (tensor, encoding) in tensors.items():
        if not _NAME.match(name.encode("ascii")):
            raise ValueError(f"bad tensor name {name!r}")
        shape = tuple(tensor.shape)
        if not 1 <= len(shape) <= limits.max_rank or min(shape) < 1 or max(shape) > _MAX_DIM:
            raise ValueError(f"tensor {name!r} has unsupported shape {shape}")
        if math.prod(shape) > limits.max_elements:
            raise ValueError(f"tensor {name!r} has more than {limits.max_elements} elements")
        parts.append(tensor_record(name, encoding, shape, encode_tensor(tensor, encoding)))
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

    def varint(self, limit: int) -> int:
        """An unsigned LEB128 number in its shortest form, at most ``limit``."""
        value = shift = 0
        while True:
            (byte,) = self.take(1)
            value |= (byte & 0x7F) << shift
            if value > limit:
                raise FrameError("number out of range")
            if not byte & 0x80:
                if byte == 0 and shift:
                    raise FrameError("number not in its shortest form")
                return value
            shift += 7
            if shift >= limit.bit_length():
                raise FrameError("number too long")


def _check_version(data: bytes) -> None:
    """FrameError unless ``data`` begins with this side's frame version, naming what it is instead."""
    if not data:
        raise FrameError("frame is truncated")
    if data.startswith(OLD_MAGIC):
        old = str(data[4]) if len(data) > 4 else "1 or 2"
        raise FrameError(
            f"unsupported frame version {old} (it starts with the old magic \\x89LSF); this side speaks "
            f"frame version {VERSION}, which dropped the magic: upgrade the other side"
        )
    if data[0] != VERSION:
        raise FrameError(f"unsupported frame version {data[0]}; this side speaks {VERSION}")


def frame_session_id(data: bytes) -> bytes | None:
    """The session id a frame carries, read from its header alone (None if it carries none);
    FrameError if the header is not a version-3 frame's. The full check is :func:`decode_frame`'s."""
    _check_version(data)
    if len(data) < _HEADER.size:
        raise FrameError("frame is truncated")
    _version, _kind, _count, flags = _HEADER.unpack_from(data)
    if not flags & FLAG_SESSION_ID:
        return None
    if len(data) < _HEADER.size + SESSION_ID_BYTES:
        raise FrameError("frame is truncated")
    return bytes(data[_HEADER.size : _HEADER.size + SESSION_ID_BYTES])


def _read_name(reader: _Reader) -> str:
    """A tensor name: one byte naming an entry of :data:`STATIC_NAMES`, or a literal name that is
    not in the table (its one canonical spelling is the table's)."""
    (first,) = reader.unpack("<B")
    if first & _STATIC_FLAG:
        index = first & ~_STATIC_FLAG
        if index >= len(STATIC_NAMES):
            raise FrameError(
                f"tensor name index {index} is past the static table ({len(STATIC_NAMES)} names)"
            )
        return STATIC_NAMES[index]
    if not 1 <= first <= _MAX_NAME:
        raise FrameError(f"bad tensor name byte {first:#04x}")
    raw_name = bytes(reader.take(first))
    if not _NAME.match(raw_name):
        raise FrameError("bad tensor name")
    name = raw_name.decode("ascii")
    if name in _STATIC_INDEX:
        raise FrameError(f"tensor name {name!r} spelled out; the static table names it")
    return name


def decode_frame(data: bytes, limits: FrameLimits = DEFAULT_LIMITS) -> Frame:
    """Parse and check a frame. Raises FrameError on anything malformed or over a limit."""
    if not isinstance(data, (bytes, bytearray)):
        raise FrameError("frame must be bytes")
    if len(data) > limits.max_bytes:
        raise FrameError(f"frame exceeds the {limits.max_bytes}-byte limit")
    _check_version(bytes(data[:5]))
    reader = _Reader(bytes(data))
    _version, kind, count, flags = _HEADER.unpack(reader.take(_HEADER.size))
    if kind not in FrameKind._value2member_map_:
        raise FrameError(f"unknown frame kind {kind}")
    if flags & ~FLAG_SESSION_ID:
        raise FrameError("reserved flags must be zero")
    if not 1 <= count <= limits.max_tensors:
        raise FrameError(f"a frame carries 1..{limits.max_tensors} tensors")
    session_id = bytes(reader.take(SESSION_ID_BYTES)) if flags & FLAG_SESSION_ID else None
    seq = reader.varint(2**64 - 1)
    tensors: dict[str, torch.Tensor] = {}
    encodings: dict[str, Encoding] = {}
    for _ in range(count):
        name = _read_name(reader)
        if name in tensors:
            raise FrameError(f"duplicate tensor {name!r}")
        encoding_id, rank = reader.unpack("<BB")
        if encoding_id not in Encoding._value2member_map_:
            raise FrameError(f"unknown encoding {encoding_id}")
        if not 1 <= rank <= limits.max_rank:
            raise FrameError(f"rank {rank} outside 1..{limits.max_rank}")
        shape = tuple(reader.varint(_MAX_DIM) for _ in range(rank))
        if min(shape) < 1:
            raise FrameError("every dimension must be at least 1")
        elements = math.prod(shape)
        if elements > limits.max_elements:
            raise FrameError(f"tensor {name!r} has more than {limits.max_elements} elements")
        encoding = Encoding(encoding_id)
        tensors[name] = _decode_tensor(reader.take(_payload_size(encoding, elements)), encoding, shape)
        encodings[name] = encoding
    if reader.pos != len(data):
        raise FrameError("trailing bytes after the last tensor")
    return Frame(FrameKind(kind), session_id, seq, tensors, encodings)
