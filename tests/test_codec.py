"""The tensor frame (version 3): round trips, one canonical encoding, and every kind of malformed
frame raises FrameError; the version byte and the tensor name byte included."""

from __future__ import annotations

import contextlib
import struct

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lambda_split._codec import STATIC_NAMES
from lambda_split.protocol import (
    Encoding,
    FrameError,
    FrameKind,
    FrameLimits,
    decode_frame,
    encode_frame,
)
from tests.helpers import varint

SID = bytes(range(16))
HEADER = 4 + 16 + 1  # fixed header, session id, sequence number 7 as a one-byte varint
#: literal tensor names: 1..32 bytes of [a-z0-9_] that are not in the static table
LITERAL_NAMES = st.from_regex(r"[a-z0-9_]{1,32}", fullmatch=True).filter(lambda n: n not in STATIC_NAMES)
NAMES = st.one_of(st.sampled_from(STATIC_NAMES), LITERAL_NAMES)


FLOATS = [Encoding.FP32, Encoding.FP16, Encoding.BF16, Encoding.INT8]


def frame(
    tensor: torch.Tensor, encoding: Encoding = Encoding.FP32, name: str = "hidden", **extra: torch.Tensor
) -> bytes:
    tensors = {name: (tensor, encoding)} | {k: (v, Encoding.U8) for k, v in extra.items()}
    return encode_frame(FrameKind.LLM_STEP, SID, 7, tensors)


def name_size(data: bytes) -> int:
    """Bytes of the first tensor's name in a frame made by :func:`frame` (one for a table name)."""
    first = data[HEADER]
    return 1 if first & 0x80 else 1 + first


def test_fp32_round_trip_is_exact() -> None:
    x = torch.randn(2, 5, 64)
    mask = torch.tensor([[0, 1, 1, 1, 1], [1, 1, 1, 1, 1]], dtype=torch.uint8)
    decoded = decode_frame(frame(x, mask=mask))
    assert decoded.kind is FrameKind.LLM_STEP and decoded.session_id == SID and decoded.seq == 7
    assert torch.equal(decoded.tensors["hidden"], x)
    assert torch.equal(decoded.tensors["mask"], mask)


@pytest.mark.parametrize(
    ("encoding", "tolerance"), [(Encoding.FP16, 1e-3), (Encoding.BF16, 8e-3), (Encoding.INT8, 1 / 127)]
)
def test_lossy_encodings_stay_within_their_rounding(encoding: Encoding, tolerance: float) -> None:
    x = torch.randn(3, 7, 576) * 4
    x[0, 0, 17] = 300.0  # an outlier channel spoils only its own int8 block
    y = decode_frame(frame(x, encoding)).tensors["hidden"]
    relative = (y - x).abs() / x.abs().clamp(min=1.0)
    if encoding is Encoding.INT8:
        blocks = x.reshape(-1, 64).abs().amax(dim=1, keepdim=True)
        relative = (y - x).reshape(-1, 64).abs() / blocks
    assert float(relative.max()) <= tolerance


def test_int8_payload_size_matches_the_documented_format() -> None:
    x = torch.randn(1, 3, 576)
    # 1725 more int8 values, 26 more fp16 block scales, and 576 takes a 2-byte varint where 1 took one
    assert (
        len(frame(x, Encoding.INT8)) - len(frame(x[..., :1], Encoding.INT8)) == (1728 - 3) + 2 * (27 - 1) + 1
    )


def test_encoder_refuses_nan() -> None:
    with pytest.raises(ValueError):
        frame(torch.tensor([[[float("nan")]]]))


@st.composite
def valid_frames(draw: st.DrawFn) -> bytes:
    shape = draw(st.lists(st.integers(1, 5), min_size=1, max_size=4))
    encoding = draw(st.sampled_from(FLOATS))
    return frame(torch.randn(*shape), encoding, draw(NAMES))


@settings(max_examples=200, suppress_health_check=[HealthCheck.too_slow])
@given(valid_frames(), st.data())
def test_truncated_frames_are_refused(data: bytes, draw: st.DataObject) -> None:
    cut = draw.draw(st.integers(0, len(data) - 1))
    with pytest.raises(FrameError):
        decode_frame(data[:cut])


@settings(max_examples=100)
@given(valid_frames(), st.binary(min_size=1, max_size=16))
def test_trailing_bytes_are_refused(data: bytes, tail: bytes) -> None:
    with pytest.raises(FrameError):
        decode_frame(data + tail)


@settings(max_examples=100)
@given(valid_frames(), st.integers(0, 255).filter(lambda v: v != 3))
def test_wrong_version_is_refused(data: bytes, version: int) -> None:
    assert data[0] == 3
    with pytest.raises(FrameError, match=f"unsupported frame version {version}; this side speaks 3"):
        decode_frame(bytes([version]) + data[1:])


@settings(max_examples=100)
@given(valid_frames(), st.integers(0, 255).filter(lambda v: v not in {1, 2, 3, 4, 5, 6, 7}))
def test_unknown_dtype_is_refused(data: bytes, dtype: int) -> None:
    offset = HEADER + name_size(data)
    with pytest.raises(FrameError, match="encoding"):
        decode_frame(data[:offset] + bytes([dtype]) + data[offset + 1 :])


@settings(max_examples=200)
@given(valid_frames(), st.data())
def test_a_shape_that_lies_about_the_byte_count_is_refused(data: bytes, draw: st.DataObject) -> None:
    offset = HEADER + name_size(data) + 1
    rank = data[offset]
    dims = list(next(iter(decode_frame(data).tensors.values())).shape)  # each < 128 here: one varint byte
    index = draw.draw(st.integers(0, rank - 1))
    lie = draw.draw(st.integers(0, 2**32 - 1).filter(lambda v: v != dims[index]))
    dims[index] = lie
    forged = data[: offset + 1] + b"".join(map(varint, dims)) + data[offset + 1 + rank :]
    with pytest.raises(FrameError):
        decode_frame(forged)


@settings(max_examples=50)
@given(st.integers(1, 4))
def test_oversized_frames_are_refused_before_decoding(extra: int) -> None:
    data = frame(torch.randn(4, 64))
    with pytest.raises(FrameError, match="limit"):
        decode_frame(data, FrameLimits(max_bytes=len(data) - extra))


def test_limits_on_rank_elements_and_tensor_count() -> None:
    data = frame(torch.randn(2, 2, 2, 2))
    with pytest.raises(FrameError, match="rank"):
        decode_frame(data, FrameLimits(max_rank=3))
    with pytest.raises(FrameError, match="elements"):
        decode_frame(data, FrameLimits(max_elements=15))
    two = frame(torch.randn(2), mask=torch.ones(2, dtype=torch.uint8))
    with pytest.raises(FrameError, match="tensors"):
        decode_frame(two, FrameLimits(max_tensors=1))


@settings(max_examples=300)
@given(st.binary(max_size=512))
def test_arbitrary_bytes_never_escape_as_another_exception(data: bytes) -> None:
    with contextlib.suppress(FrameError):
        decode_frame(data)


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
@given(valid_frames(), st.data())
def test_any_single_byte_corruption_decodes_or_raises_frame_error(data: bytes, draw: st.DataObject) -> None:
    position = draw.draw(st.integers(0, len(data) - 1))
    value = draw.draw(st.integers(0, 255))
    with contextlib.suppress(FrameError):
        decode_frame(data[:position] + bytes([value]) + data[position + 1 :])


def test_nan_and_inf_on_the_wire_are_refused() -> None:
    data = bytearray(frame(torch.ones(1, 1, 2)))
    data[-4:] = struct.pack("<f", float("inf"))
    with pytest.raises(FrameError, match="NaN or Inf"):
        decode_frame(bytes(data))


@settings(max_examples=100, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.lists(NAMES, min_size=1, max_size=8, unique=True),
    st.sampled_from([Encoding.FP32, Encoding.FP16, Encoding.BF16]),
    st.integers(0, 2**64 - 1),
    st.booleans(),
)
def test_any_names_round_trip_and_every_frame_has_one_encoding(
    names: list[str], encoding: Encoding, seq: int, with_id: bool
) -> None:
    tensors = {name: (torch.randn(2, 3), encoding) for name in names}
    data = encode_frame(FrameKind.LLM_RESULT, SID if with_id else None, seq, tensors)
    decoded = decode_frame(data)
    assert list(decoded.tensors) == names and decoded.seq == seq
    # a table name costs one byte, a literal one its length and a length byte
    name_bytes = sum(1 if n in STATIC_NAMES else 1 + len(n) for n in names)
    payload = len(names) * 6 * (4 if encoding is Encoding.FP32 else 2)
    assert len(data) == 4 + 16 * with_id + len(varint(seq)) + name_bytes + len(names) * 4 + payload
    # decoding and encoding again gives back the very same bytes (receipts hash frame bytes)
    again = {n: (t, decoded.encodings[n]) for n, t in decoded.tensors.items()}
    assert encode_frame(decoded.kind, decoded.session_id, decoded.seq, again) == data


@settings(max_examples=100, suppress_health_check=[HealthCheck.too_slow])
@given(valid_frames(), st.integers(0, 255))
def test_every_name_byte_is_a_literal_length_a_table_index_or_refused(data: bytes, byte: int) -> None:
    forged = data[:HEADER] + bytes([byte]) + data[HEADER + 1 :]
    if 0x80 <= byte < 0x80 + len(STATIC_NAMES):
        if data[HEADER] & 0x80:  # one table name for another: the same frame under that name
            assert list(decode_frame(forged).tensors) == [STATIC_NAMES[byte & 0x7F]]
    elif byte >= 0x80:
        with pytest.raises(FrameError, match=f"tensor name index {byte & 0x7F} is past the static table"):
            decode_frame(forged)
    elif byte == 0 or byte > 32:
        with pytest.raises(FrameError, match="bad tensor name byte"):
            decode_frame(forged)
    else:
        with contextlib.suppress(FrameError):  # a literal of another length: misaligned, mostly refused
            decode_frame(forged)


@pytest.mark.parametrize("index", range(len(STATIC_NAMES)))
def test_a_literal_spelling_of_a_table_name_is_refused(index: int) -> None:
    name = STATIC_NAMES[index]
    data = frame(torch.randn(2, 3), name=name)
    assert data[HEADER] == 0x80 | index  # the encoder always uses the table
    literal = data[:HEADER] + bytes([len(name)]) + name.encode() + data[HEADER + 1 :]
    with pytest.raises(FrameError, match=f"tensor name '{name}' spelled out; the static table names it"):
        decode_frame(literal)
    other = frame(torch.randn(2, 3), name=f"{name}_x")  # a literal that is not a table name is fine
    assert other[HEADER] == len(name) + 2 and list(decode_frame(other).tensors) == [f"{name}_x"]
