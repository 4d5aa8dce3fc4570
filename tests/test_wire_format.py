"""Frame version 3 (lambda_split._codec): the compact decode step byte for byte, the static name
table, varints, fp16 block scales, INT4 and INT2; frames of versions 1 and 2 are refused."""

from __future__ import annotations

import contextlib
import struct

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lambda_split import Checkpoint, LocalTransport, ProtocolMismatch, SplitClient
from lambda_split._codec import STATIC_NAMES
from lambda_split._defences import quantise_blockwise
from lambda_split._quant import scales_fp16
from lambda_split._receipts import RECEIPT_TENSOR, attach_receipt, split_receipt
from lambda_split.diffusion._loop import BEGIN_NAMES
from lambda_split.diffusion._trunk import CONTEXT_NAMES, EXACT_NAMES
from lambda_split.protocol import (
    PROTOCOL_VERSION,
    Encoding,
    FrameError,
    FrameKind,
    decode_frame,
    encode_frame,
    frame_session_id,
    llm_step_inputs,
    llm_step_tensors,
)
from tests.helpers import varint

SID = bytes(range(16))
QUANTISED = [(Encoding.INT8, 127), (Encoding.INT4, 7), (Encoding.INT2, 1)]


def decode_step(hidden: torch.Tensor, encoding: Encoding, seq: int = 5) -> bytes:
    mask = torch.ones(hidden.shape[:2], dtype=torch.uint8)
    return encode_frame(FrameKind.LLM_STEP, None, seq, llm_step_tensors(hidden, mask, encoding))


@pytest.mark.parametrize(
    ("encoding", "payload"),
    [(Encoding.FP16, 1152), (Encoding.INT8, 594), (Encoding.INT4, 306), (Encoding.INT2, 162)],
)
def test_a_decode_step_frame_of_smollm2_has_exactly_the_documented_bytes(
    encoding: Encoding, payload: int
) -> None:
    # header: version, kind, count, flags + seq 1; tensor: name 1 (the table's "hidden"), encoding 1,
    # rank 1, dims 1 + 1 + 2 (576 is a 2-byte varint)
    step = decode_step(torch.randn(1, 1, 576), encoding)
    assert len(step) == 5 + 7 + payload
    assert step[:5] == bytes((3, FrameKind.LLM_STEP, 1, 0, 5))
    assert step[5:12] == bytes((0x80 | STATIC_NAMES.index("hidden"), encoding, 3, 1, 1)) + varint(576)
    # the literal name "x" costs 2 bytes, its encoding and rank 2, its one dim 576 two
    assert payload == len(encode_frame(FrameKind.LLM_STEP, None, 0, {"x": (torch.randn(576), encoding)})) - 11


def test_a_decode_step_result_costs_the_same_and_a_receipt_four_bytes_plus_its_signature() -> None:
    hidden = {"hidden": (torch.randn(1, 1, 576), Encoding.FP16)}
    result = encode_frame(FrameKind.LLM_RESULT, None, 5, hidden)
    assert len(result) == 5 + 7 + 1152
    signature = bytes(range(71))  # DER ECDSA P-256 signatures are 70-72 bytes
    signed = attach_receipt(result, signature)
    # name 1 (the table's "receipt"), encoding 1, rank 1, dim 1 (71 < 128), then the signature
    assert len(signed) == len(result) + 4 + 71
    assert signed[2] == 2 and signed[len(result) : len(result) + 4] == bytes((0x82, Encoding.U8, 1, 71))
    assert list(decode_frame(signed).tensors) == ["hidden", RECEIPT_TENSOR]
    assert split_receipt(signed) == (result, signature)


def test_the_static_table_is_pinned_and_names_every_tensor_the_protocol_sends() -> None:
    # the table is part of the format: entries are appended, never reordered or removed
    assert STATIC_NAMES[:15] == (
        "hidden", "mask", "receipt", "encoder_hidden_states", "text_embeds", "time_ids", "latents",
        "timestep", "noise_pred", "noise", "params", "scheduler", "generator", "step", "input_digest",
    )  # fmt: skip
    assert len(set(STATIC_NAMES)) == len(STATIC_NAMES) <= 128
    sent = {"hidden", "mask", RECEIPT_TENSOR, "latents", "noise_pred", "input_digest"}
    assert sent | set(CONTEXT_NAMES) | BEGIN_NAMES | EXACT_NAMES <= set(STATIC_NAMES)


def test_the_session_id_is_optional_and_flagged() -> None:
    tensors = {"hidden": (torch.randn(1, 2, 64), Encoding.FP32)}
    with_id = encode_frame(FrameKind.LLM_RESULT, SID, 300, tensors)
    without = encode_frame(FrameKind.LLM_RESULT, None, 300, tensors)
    assert len(with_id) - len(without) == 16 and with_id[3] == 1 and with_id[4:20] == SID
    assert decode_frame(with_id).session_id == SID == frame_session_id(with_id)
    assert decode_frame(without).session_id is None is frame_session_id(without)
    assert decode_frame(without).seq == 300
    with pytest.raises(FrameError, match="reserved flags"):
        decode_frame(without[:3] + b"\x02" + without[4:])


def v2_frame() -> bytes:
    """A well-formed version-2 frame: the magic, then the version 3 layout with a spelled-out name."""
    return b"\x89LSF" + bytes((2, 1, 1, 0, 0)) + b"\x06hidden" + bytes((1, 1, 1)) + struct.pack("<f", 1.0)


def test_a_version_1_frame_is_refused() -> None:
    # the 32-byte v1 header, then a v1 tensor record (u32 dims, u64 payload length)
    v1 = struct.pack("<4sBBBB16sQ", b"\x89LSF", 1, 1, 1, 0, SID, 0)
    v1 += b"\x06hidden" + struct.pack("<BBIQ", 1, 1, 1, 4) + struct.pack("<f", 1.0)
    with pytest.raises(FrameError, match=r"unsupported frame version 1 \(it starts with the old magic"):
        decode_frame(v1)
    with pytest.raises(FrameError, match="unsupported frame version 1"):
        frame_session_id(v1)


def test_a_version_2_frame_is_refused_naming_the_change() -> None:
    message = r"unsupported frame version 2 .*old magic.* speaks frame version 3, which dropped the magic"
    with pytest.raises(FrameError, match=message):
        decode_frame(v2_frame())
    with pytest.raises(FrameError, match=message):
        frame_session_id(v2_frame())
    with pytest.raises(FrameError, match=r"version 1 or 2 \(it starts with the old magic"):
        decode_frame(b"\x89LSF")
    for first in (0, 1, 2, 4, 0x89, 255):  # not the magic: the first byte is the version
        with pytest.raises(FrameError, match=f"unsupported frame version {first}; this side speaks 3"):
            decode_frame(bytes((first,)) + v2_frame()[5:])


def test_a_client_parts_from_a_server_of_another_protocol_version(tiny: Checkpoint) -> None:
    assert PROTOCOL_VERSION == 3
    info = {
        "model": tiny.name,
        "fingerprint": "sha256:00",
        "split": [2, 6],
        "num_layers": 8,
        "hidden_size": 64,
        "security": "plain",
        "protocol_version": 2,
    }
    transport = LocalTransport(None, info)  # type: ignore[arg-type]  # refused before any step
    message = r"server speaks protocol 2, this client 3 \(frame version 3 on the wire\); upgrade the older"
    with pytest.raises(ProtocolMismatch, match=message):
        SplitClient.from_transport(transport, tiny)


@pytest.mark.parametrize(
    "seq_bytes",
    [b"\x80\x00", b"\x85\x00", b"\xff" * 9 + b"\x02", b"\x80" * 10 + b"\x01", b"\x80" * 200],
)
def test_sequence_numbers_in_a_long_or_overlong_form_are_refused(seq_bytes: bytes) -> None:
    good = encode_frame(FrameKind.LLM_STEP, None, 0, {"x": (torch.ones(1), Encoding.FP32)})
    with pytest.raises(FrameError, match=r"shortest|range|long|truncated"):
        decode_frame(good[:4] + seq_bytes + good[5:])


def test_a_varint_is_read_no_further_than_its_longest_form() -> None:
    good = encode_frame(FrameKind.LLM_STEP, None, 0, {"x": (torch.ones(1), Encoding.FP32)})
    with pytest.raises(FrameError, match="too long"):  # refused at byte 10, not after the 200th
        decode_frame(good[:4] + b"\x80" * 200 + good[5:])


def test_the_largest_sequence_number_round_trips_and_a_larger_one_is_refused() -> None:
    tensors = {"x": (torch.ones(1), Encoding.FP32)}
    assert decode_frame(encode_frame(FrameKind.LLM_STEP, None, 2**64 - 1, tensors)).seq == 2**64 - 1
    with pytest.raises(ValueError):
        encode_frame(FrameKind.LLM_STEP, None, 2**64, tensors)


def test_a_dimension_in_a_long_form_is_refused() -> None:
    good = encode_frame(FrameKind.LLM_STEP, None, 0, {"x": (torch.ones(1), Encoding.FP32)})
    dims_at = 5 + 2 + 2  # header, name, encoding and rank
    assert good[dims_at] == 1
    with pytest.raises(FrameError, match="shortest"):
        decode_frame(good[:dims_at] + b"\x81\x00" + good[dims_at + 1 :])
    with pytest.raises(FrameError, match=r"range|long"):
        decode_frame(good[:dims_at] + b"\xff\xff\xff\xff\x7f" + good[dims_at + 1 :])


@pytest.mark.parametrize("width", [64, 576])
@pytest.mark.parametrize(("encoding", "levels"), QUANTISED)
def test_the_wire_carries_exactly_what_the_quant_defence_computes(
    encoding: Encoding, levels: int, width: int
) -> None:
    x = torch.randn(2, 3, width) * torch.logspace(-3, 3, width)
    x[0, 0, 5] = 900.0  # an outlier spoils only its own block
    sent = decode_frame(decode_step(x, encoding)).tensors["hidden"]
    assert torch.equal(sent, quantise_blockwise(x, levels))
    again = decode_frame(decode_step(sent, encoding)).tensors["hidden"]  # defence, then the wire
    assert torch.equal(again, sent)


@settings(max_examples=60, deadline=None)
@given(
    st.sampled_from(QUANTISED),
    st.lists(st.floats(-1e6, 1e6, allow_nan=False, width=32), min_size=1, max_size=150),
    st.sampled_from([1e-40, 1e-20, 1e-7, 1.0, 1e3]),
)
def test_quantised_round_trips_stay_within_half_a_level(
    case: tuple[Encoding, int], values: list[float], scale: float
) -> None:
    encoding, levels = case
    x = torch.tensor(values, dtype=torch.float32) * scale
    if float(x.abs().max()) / levels > 65504:  # its scale would not fit in fp16
        with pytest.raises(ValueError, match="too large"):
            encode_frame(FrameKind.LLM_STEP, None, 0, {"x": (x, encoding)})
        return
    y = decode_frame(encode_frame(FrameKind.LLM_STEP, None, 0, {"x": (x, encoding)})).tensors["x"]
    assert torch.isfinite(y).all()
    padded = torch.nn.functional.pad(x, (0, (-len(values)) % 64)).view(-1, 64)
    step = scales_fp16(padded.abs().amax(dim=1), levels)  # one level of each block
    error = torch.nn.functional.pad((y - x).abs(), (0, (-len(values)) % 64)).view(-1, 64)
    assert bool((error <= step[:, None] / 2 * 1.001 + 1e-45).all())


def test_fp16_scales_never_overflow_or_vanish() -> None:
    tiny = torch.full((64,), 1e-30)
    assert float(scales_fp16(tiny.abs().amax().view(1), 127)[0]) == 2.0**-24  # fp16's smallest subnormal
    assert float(scales_fp16(torch.zeros(1), 7)[0]) == 2.0**-24  # never 0 (0 / 0 would be NaN)
    huge = torch.full((64,), 65504.0 * 127)
    back = decode_frame(encode_frame(FrameKind.LLM_STEP, None, 0, {"x": (huge, Encoding.INT8)})).tensors["x"]
    assert torch.isfinite(back).all() and float((back - huge).abs().max() / huge[0]) < 1e-3
    with pytest.raises(ValueError, match="too large"):
        encode_frame(FrameKind.LLM_STEP, None, 0, {"x": (huge * 2, Encoding.INT8)})
    for levels in (127, 7, 1):  # rounded up: no value ever needs a level beyond L
        absmax = torch.tensor(np.random.default_rng(levels).uniform(1e-6, 1e4, 4096), dtype=torch.float32)
        assert bool((absmax / scales_fp16(absmax, levels) <= levels).all())


def payload_of(encoding: Encoding, count: int = 64) -> tuple[bytes, int]:
    """A frame of one tensor ``x`` and the offset of its payload."""
    data = encode_frame(FrameKind.LLM_STEP, None, 0, {"x": (torch.linspace(-1, 1, count), encoding)})
    return data, len(data) - len(encoding_payload(encoding, count))


def encoding_payload(encoding: Encoding, count: int) -> bytes:
    from lambda_split.protocol import encode_tensor

    return encode_tensor(torch.linspace(-1, 1, count), encoding)


@pytest.mark.parametrize(
    ("encoding", "scale_bytes", "poke", "problem"),
    [
        (Encoding.INT8, struct.pack("<e", -1.0), None, "non-negative"),
        (Encoding.INT4, struct.pack("<e", float("inf")), None, "finite"),
        (Encoding.INT2, b"\xff\x7f", None, "finite"),  # a NaN
        (Encoding.INT8, None, (0, 0x80), "-127..127"),  # -128 is no level
        (Encoding.INT4, None, (0, 0xF0), "codes"),  # code 15 > 2 * 7
        (Encoding.INT2, None, (0, 0x03), "codes"),  # code 3 > 2 * 1
    ],
)
def test_malformed_quantised_payloads_are_refused(
    encoding: Encoding, scale_bytes: bytes | None, poke: tuple[int, int] | None, problem: str
) -> None:
    data, at = payload_of(encoding)
    forged = bytearray(data)
    if scale_bytes is not None:
        forged[at : at + 2] = scale_bytes
    if poke is not None:
        forged[at + 2 + poke[0]] = poke[1]
    with pytest.raises(FrameError, match=problem):
        decode_frame(bytes(forged))


@pytest.mark.parametrize(("encoding", "count"), [(Encoding.INT4, 63), (Encoding.INT2, 61)])
def test_padding_bits_of_packed_payloads_must_be_zero(encoding: Encoding, count: int) -> None:
    data, _ = payload_of(encoding, count)
    with pytest.raises(FrameError, match="padding"):
        decode_frame(data[:-1] + bytes((data[-1] | 0xC0,)))


@settings(max_examples=200, deadline=None)
@given(st.sampled_from([Encoding.INT4, Encoding.INT2, Encoding.INT8]), st.integers(1, 130), st.data())
def test_any_corrupted_quantised_frame_decodes_or_raises_frame_error(
    encoding: Encoding, count: int, draw: st.DataObject
) -> None:
    data, _ = payload_of(encoding, count)
    cut = draw.draw(st.integers(0, len(data)))
    position = draw.draw(st.integers(0, len(data) - 1))
    forged = data[:position] + bytes((draw.draw(st.integers(0, 255)),)) + data[position + 1 :]
    for candidate in (data[:cut], forged):
        with contextlib.suppress(FrameError):
            decoded = decode_frame(candidate)
            assert all(torch.isfinite(t).all() for t in decoded.tensors.values())


def test_int4_and_int2_are_not_session_wires() -> None:
    assert Encoding.parse("int8") is Encoding.INT8
    for name in ("int4", "int2"):
        with pytest.raises(ValueError, match="uplink only"):
            Encoding.parse(name)


def test_an_absent_mask_is_all_ones_and_a_present_one_is_still_checked() -> None:
    hidden = torch.randn(2, 3, 64)
    ones = torch.ones(2, 3, dtype=torch.uint8)
    assert "mask" not in llm_step_tensors(hidden, ones, Encoding.FP32)
    partial = ones.clone()
    partial[0, 0] = 0
    assert torch.equal(llm_step_tensors(hidden, partial, Encoding.FP32)["mask"][0], partial)
    bare = decode_frame(encode_frame(FrameKind.LLM_STEP, None, 0, {"hidden": (hidden, Encoding.FP32)}))
    assert torch.equal(llm_step_inputs(bare)[1], ones)
    for bad in (ones * 2, torch.ones(2, 4, dtype=torch.uint8)):
        tensors = {"hidden": (hidden, Encoding.FP32), "mask": (bad, Encoding.U8)}
        with pytest.raises(FrameError, match="mask"):
            llm_step_inputs(decode_frame(encode_frame(FrameKind.LLM_STEP, None, 0, tensors)))
