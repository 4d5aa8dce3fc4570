"""Each detector flags its deliberately leaky positive control and stays quiet on ciphertext."""

from __future__ import annotations

import io
import json
import os
import ssl

import numpy as np
import pytest
import torch
from PIL import Image

from tests.threat_model.conftest import aesgcm_seal
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
    frame = b"\x89LSF" + os.urandom(60) + encode_wire(hidden[1], wire) + os.urandom(9)
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


@pytest.mark.parametrize("wire", ["fp32", "fp16", "bf16", "int8"])
def test_encoding_matches_the_project_codec(hidden: list[torch.Tensor], wire: str) -> None:
    codec = pytest.importorskip("lambda_split.protocol")
    for tensor in hidden:
        assert encode_wire(tensor, wire) == codec.encode_tensor(tensor, codec.Encoding.parse(wire))


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
