"""Each detector flags its deliberately leaky positive control and stays quiet on ciphertext."""

from __future__ import annotations

import base64
import gzip
import io
import json
import os
import ssl
import struct
import urllib.parse
import zlib

import numpy as np
import pytest
import torch
from PIL import Image

from tests.threat_model.conftest import aesgcm_seal
from threat_model._unpack import layers
from threat_model.baselines import CloudBaselineServer, cloud_complete
from threat_model.capture import capture_loopback
from threat_model.detectors import (
    HiddenStateDetector,
    ImageSignatureDetector,
    PixelDetector,
    TextLeakDetector,
    TokenIdDetector,
    encode_wire,
    scan_bytes,
    scan_deep,
    scan_streams,
)

PROMPT = "Please summarise my Confidential medical report about Ünïcode café naïveté"
RANDOM = os.urandom(1 << 20)


def flagged(detector: object, data: bytes) -> set[str]:
    findings = scan_bytes([detector], data)  # type: ignore[list-item]
    return {label.split(":")[-1].split("#")[0] for f in findings for label in f.variant.split("|")}


# --- text -------------------------------------------------------------------------------


def test_cloud_baseline_leaks_prompt_and_answer_in_plaintext() -> None:
    with CloudBaselineServer() as server, capture_loopback({server.port}) as cap:
        answer = cloud_complete(cap.client_port(server.port), PROMPT)
    detectors = [TextLeakDetector([PROMPT], name="prompt"), TokenIdDetector(answer["token_ids"])]
    findings = scan_streams(detectors, cap.streams())
    where = {(f.detector, f.direction) for f in findings}
    assert ("prompt", "c2s") in where  # the request body
    assert ("prompt", "s2c") in where  # the echoed answer
    assert ("token_ids", "s2c") in where  # token ids as a JSON list
    assert all(PROMPT not in str(f) and PROMPT[8:30] not in str(f) for f in findings)


def test_tls_hides_the_same_baseline(tls_contexts: tuple[ssl.SSLContext, ssl.SSLContext]) -> None:
    server_ctx, client_ctx = tls_contexts
    with CloudBaselineServer(ssl_context=server_ctx) as server, capture_loopback({server.port}) as cap:
        answer = cloud_complete(cap.client_port(server.port), PROMPT, ssl_context=client_ctx)
    assert answer["text"] == PROMPT
    streams = cap.streams()
    assert streams and all(s.c2s.data.startswith(b"\x16\x03") for s in streams)
    assert scan_streams([TextLeakDetector([PROMPT]), TokenIdDetector(answer["token_ids"])], streams) == []


@pytest.mark.parametrize(
    ("encode", "variant"),
    [
        (lambda s: s.encode(), "utf-8"),
        (lambda s: s.upper().encode(), "utf-8"),
        (lambda s: s.encode("utf-16-le"), "utf-16-le"),
        (lambda s: s.encode("utf-16-be"), "utf-16-be"),
        (lambda s: json.dumps({"p": s}).encode(), "json"),
        (lambda s: json.dumps({"p": s}, ensure_ascii=False).encode(), "utf-8"),
    ],
)
def test_text_encodings_are_found(encode: object, variant: str) -> None:
    haystack = RANDOM[:5000] + encode(PROMPT) + RANDOM[5000:9000]  # type: ignore[operator]
    assert variant in flagged(TextLeakDetector(PROMPT), haystack)


@pytest.mark.parametrize(
    ("encode", "variant"),
    [
        (lambda s: b"GET /search?q=" + urllib.parse.quote(s, safe="").encode() + b" HTTP/1.1", "url"),
        (lambda s: b"q=" + urllib.parse.quote_plus(s).encode() + b"&x=1", "url-plus"),
        (lambda s: b"token=" + base64.urlsafe_b64encode(b"ab" + s.encode()), "base64url"),
        (lambda s: b"x-dbg: " + s.encode().hex().encode(), "hex"),
        (lambda s: b"X-DBG: " + s.encode().hex().upper().encode(), "HEX"),
    ],
)
def test_url_and_text_armour_encodings_are_found(encode: object, variant: str) -> None:
    """The forms a prompt takes in a query string, a form body, a header or a URL-safe token."""
    secret = "what is my diagnosis??? >>> café & co / 100% sure"  # base64 of "???>>>" has / and +
    haystack = RANDOM[:3000] + encode(secret) + RANDOM[:50]  # type: ignore[operator]
    found = flagged(TextLeakDetector(secret), haystack)
    assert variant in found, found
    assert scan_bytes([TextLeakDetector(secret)], aesgcm_seal(encode(secret))) == []  # type: ignore[operator]


def test_escaped_newlines_and_quotes_in_json() -> None:
    secret = 'line one\nsaid "hello there" to me'
    assert "json" in flagged(TextLeakDetector(secret), json.dumps([secret]).encode())
    assert "json-utf8" in flagged(
        TextLeakDetector(secret + " é"), json.dumps([secret], ensure_ascii=False).encode()
    )


def test_any_eight_character_substring_but_not_seven() -> None:
    detector = TextLeakDetector(PROMPT)
    assert flagged(detector, RANDOM[:100] + b"xx" + b"medical " + b"yy")
    assert not flagged(detector, RANDOM[:100] + b"xx" + b"medica" + b"yy")
    assert flagged(detector, b"..MEDICAL REPORT..")


def test_base64_is_found() -> None:
    import base64

    assert "base64" in flagged(TextLeakDetector(PROMPT), b"x=" + base64.b64encode(b"Q" + PROMPT.encode()))


def test_text_negative_controls() -> None:
    detector = TextLeakDetector(PROMPT)
    assert scan_bytes([detector], RANDOM) == []
    assert scan_bytes([detector], aesgcm_seal(json.dumps({"prompt": PROMPT}).encode())) == []
    assert scan_bytes([detector], b"POST /v1/sessions HTTP/1.1\r\nContent-Type: application/json\r\n") == []


def test_secret_is_not_in_repr() -> None:
    assert "Confidential" not in repr(TextLeakDetector(PROMPT))


# --- token ids --------------------------------------------------------------------------

IDS = [1, 15043, 338, 263, 29871, 17251, 3461, 1048, 590, 49151]


@pytest.mark.parametrize("dtype", ["<i4", ">i4", "<i8", ">i8", "<u2", ">u2"])
def test_packed_token_ids_are_found(dtype: str) -> None:
    packed = np.asarray(IDS[2:8], dtype=dtype).tobytes()
    assert flagged(TokenIdDetector(IDS), RANDOM[:333] + packed + RANDOM[:77])


def test_short_sequences_and_decimal_lists() -> None:
    assert flagged(TokenIdDetector([17251, 3461]), RANDOM[:10] + np.asarray([17251, 3461], "<i8").tobytes())
    assert "decimal', '" in flagged(TokenIdDetector(IDS), json.dumps({"ids": IDS}).encode())


@pytest.mark.parametrize(
    ("encode", "variant"),
    [
        (lambda ids: " ".join(map(str, ids)).encode(), "decimal' '"),
        (lambda ids: "\n".join(map(str, ids)).encode(), "decimal'\\n'"),
        (lambda ids: base64.b64encode(b"A" + np.asarray(ids, "<i4").tobytes()), "int32-le/base64"),
        (lambda ids: base64.urlsafe_b64encode(np.asarray(ids, ">i8").tobytes()), "int64-be/base64"),
        (lambda ids: base64.b64encode(",".join(map(str, ids)).encode()), "decimal','/base64"),
    ],
)
def test_token_ids_space_separated_and_base64_are_found(encode: object, variant: str) -> None:
    haystack = RANDOM[:900] + encode(IDS) + RANDOM[:90]  # type: ignore[operator]
    found = flagged(TokenIdDetector(IDS), haystack)
    assert any(variant in v for v in found), found


def test_token_id_negative_controls() -> None:
    detector = TokenIdDetector(IDS)
    assert scan_bytes([detector], RANDOM) == []
    assert scan_bytes([detector], aesgcm_seal(np.asarray(IDS, "<i4").tobytes())) == []
    # three consecutive ids are below the window
    assert scan_bytes([detector], np.asarray(IDS[:3], "<i4").tobytes()) == []


# --- hidden states ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def hidden() -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    return [torch.randn(1, 7, 64, generator=gen) * 3, torch.randn(1, 1, 64, generator=gen)]


@pytest.mark.parametrize("wire", ["fp32", "fp16", "bf16", "int8"])
def test_plaintext_hidden_state_frames_are_found(hidden: list[torch.Tensor], wire: str) -> None:
    detector = HiddenStateDetector(hidden, wire)
    frame = b"\x03\x01\x01\x00" + os.urandom(60) + encode_wire(hidden[1], wire) + os.urandom(9)
    findings = scan_bytes([detector], RANDOM[:1000] + frame)
    assert [f.variant for f in findings] == [f"{wire}#1"], findings
    assert findings[0].length >= 64
    assert scan_bytes([detector], aesgcm_seal(frame)) == []
    other = [torch.randn_like(t) for t in hidden]
    assert scan_bytes([detector], b"".join(encode_wire(t, wire) for t in other)) == []


def test_custom_codec_callable(hidden: list[torch.Tensor]) -> None:
    def codec(tensor: torch.Tensor) -> bytes:
        return tensor.numpy().astype(">f4").tobytes()

    assert flagged(HiddenStateDetector(hidden, codec), codec(hidden[0]))


def _bf16_le(values: np.ndarray) -> bytes:
    """bfloat16 by round-to-nearest-even, written out with struct: an encoder that shares nothing."""
    out = b""
    for value in values.astype(np.float32).tolist():
        (bits,) = struct.unpack("<I", struct.pack("<f", value))
        out += struct.pack("<H", (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16)
    return out


INDEPENDENT = {
    "fp32": lambda v: struct.pack(f"<{len(v)}f", *v.tolist()),
    "fp16": lambda v: struct.pack(f"<{len(v)}e", *v.tolist()),
    "bf16": _bf16_le,
}


@pytest.mark.parametrize("wire", sorted(INDEPENDENT))
def test_encoding_matches_an_independent_little_endian_encoder(hidden: list[torch.Tensor], wire: str) -> None:
    """The codec's bytes (which the detector searches for) against struct's, byte order fixed."""
    for tensor in hidden:
        values = tensor.reshape(-1).numpy()
        assert encode_wire(tensor, wire) == INDEPENDENT[wire](values)


@pytest.mark.parametrize("form", ["fp32-le", "fp32-be", "fp16-le", "fp16-be", "bf16-le", "bf16-be"])
@pytest.mark.parametrize("armour", ["raw", "base64", "base64url", "hex"])
def test_hidden_states_are_found_in_any_float_format_and_armour(
    hidden: list[torch.Tensor], form: str, armour: str
) -> None:
    values = hidden[0].reshape(-1).numpy()
    kind, order = form.split("-")
    endian = "<" if order == "le" else ">"
    if kind == "bf16":
        raw = _bf16_le(values)
        raw = (
            raw
            if order == "le"
            else b"".join(raw[i + 1 : i + 2] + raw[i : i + 1] for i in range(0, len(raw), 2))
        )
    else:
        raw = struct.pack(f"{endian}{len(values)}{'f' if kind == 'fp32' else 'e'}", *values.tolist())
    payload = {
        "raw": raw,
        "base64": base64.b64encode(b"xy" + raw),  # misaligned by two bytes
        "base64url": base64.urlsafe_b64encode(b"z" + raw),
        "hex": raw.hex().encode(),
    }[armour]
    detector = HiddenStateDetector(hidden, "fp16")
    found = {f.variant for f in scan_bytes([detector], RANDOM[:777] + b'{"h": "' + payload + b'"}')}
    expected = "fp16" if form == "fp16-le" else form  # the codec's own bytes keep the codec's label
    assert any(v.startswith(expected) for v in found), found
    assert scan_bytes([detector], aesgcm_seal(payload)) == []


def test_hidden_states_inside_compression_and_base64_are_found(hidden: list[torch.Tensor]) -> None:
    raw = hidden[0].numpy().astype(">f2").tobytes()
    detector = HiddenStateDetector(hidden, "fp16")
    for name, blob in (
        ("zlib", zlib.compress(raw)),
        ("gzip", gzip.compress(raw)),
        ("base64", base64.b64encode(zlib.compress(raw))),
    ):
        findings = scan_deep([detector], RANDOM[:500] + b"\r\n\r\n" + blob)
        assert findings and all(name in f.variant for f in findings), (name, findings)
        assert scan_deep([detector], aesgcm_seal(blob)) == []
    deflated = zlib.compressobj(wbits=-15)
    raw_deflate = deflated.compress(raw) + deflated.flush()
    assert scan_deep([detector], b"POST / HTTP/1.1\r\nx: 1\r\n\r\n" + raw_deflate)


def test_a_decompression_bomb_is_bounded() -> None:
    bomb = zlib.compress(bytes(256 << 20), 9)  # 256 MiB of zeros in about 250 KiB
    nested = zlib.compress(bomb)
    found = layers(b"\r\n\r\n".join([nested] * 8), max_output=16 << 20, per_candidate=4 << 20)
    assert found and sum(len(layer.data) for layer in found) <= 16 << 20
    assert max(len(layer.data) for layer in found) <= 4 << 20


def test_zero_padding_is_not_a_hidden_state_leak() -> None:
    detector = HiddenStateDetector([torch.zeros(1, 4, 64), torch.randn(1, 1, 64)], "fp16")
    assert scan_bytes([detector], bytes(4096)) == []


# --- pixels -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def image() -> np.ndarray:
    return np.random.default_rng(3).integers(0, 256, size=(32, 48, 3), dtype=np.uint8)


@pytest.mark.parametrize("form", ["rgb", "rgba", "bgr"])
def test_raw_pixel_rows_are_found(image: np.ndarray, form: str) -> None:
    array = {"rgb": image, "bgr": image[:, :, ::-1],
             "rgba": np.concatenate([image, np.full((32, 48, 1), 255, np.uint8)], axis=2)}[form]  # fmt: skip
    rows = np.ascontiguousarray(array[10:13]).tobytes()
    assert form in flagged(PixelDetector([image]), RANDOM[:99] + rows)


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "WEBP", "GIF"])
def test_encoded_images_are_found_by_signature(image: np.ndarray, fmt: str) -> None:
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format=fmt)
    assert flagged(ImageSignatureDetector(), RANDOM[:500] + buffer.getvalue()) == {fmt.lower()}


@pytest.mark.parametrize("order", ["<f4", ">f4"])
def test_an_image_as_floats_is_found(image: np.ndarray, order: str) -> None:
    floats = image.astype(np.float32) / 255.0
    detector = HiddenStateDetector([floats], "fp32", window=256, name="pixels")
    assert flagged(detector, RANDOM[:99] + floats.astype(order).tobytes())


@pytest.mark.parametrize("fmt", ["PNG", "JPEG"])
def test_an_image_in_base64_is_found(image: np.ndarray, fmt: str) -> None:
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format=fmt)
    url = b"data:image/" + fmt.lower().encode() + b";base64," + base64.b64encode(buffer.getvalue())
    assert flagged(ImageSignatureDetector(), RANDOM[:500] + json.dumps({"img": url.decode()}).encode())


def test_pixel_negative_controls(image: np.ndarray) -> None:
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    detectors = [PixelDetector([image]), ImageSignatureDetector()]
    assert scan_bytes(detectors, RANDOM * 4) == []
    assert scan_bytes(detectors, aesgcm_seal(buffer.getvalue() + image.tobytes())) == []


def test_flat_images_do_not_match_zero_padding() -> None:
    flat = np.zeros((8, 8, 3), dtype=np.uint8)
    flat[4, 4] = 200
    assert scan_bytes([PixelDetector([flat])], bytes(10_000)) == []
