"""Mutation self-test: each planted capture fault or leak makes ``lambda-split eavesdrop`` exit 1
and name the check that caught it. An honest run of the same configuration passes (test_suite.py
and the first test here), so a failure below is the plant's doing.

The smallest configuration: tiny-random-llama, one session per mode, no sweep, aesgcm (the mode
whose outer HTTP surface gives a leak the most room), plus the plain control that every run does.
"""

from __future__ import annotations

import base64
import json
import zlib
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest

from tests.threat_model import plants
from threat_model.suite import run_eavesdrop

PROMPT = "My doctor in Paris says I have the flu."
LIGHT = {"out": None, "prompt": PROMPT, "diffusion": False, "sweep": False, "sessions": 1}
# For a plant whose verdict is read off the default path only ("aesgcm/llm: ...", "aesgcm/diffusion: ..."):
# the HTTP path's sessions would run next to it for no assertion (the HTTP path's own plants are
# test_prefill_hidden_states_in_an_outer_header_fail_twice, and the unplanted runs check both paths).
STREAM_ONLY = {"transports": ("stream",)}


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread() -> Iterator[None]:
    torch = pytest.importorskip("torch")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def run(
    capsys: pytest.CaptureFixture[str], security: str = "aesgcm", **options: Any
) -> tuple[int, dict[str, Any]]:
    code = run_eavesdrop(security=security, as_json=True, model="tiny-random-llama", progress=lambda _m: None,
                         **{**LIGHT, **options})  # fmt: skip
    report: dict[str, Any] = json.loads(capsys.readouterr().out)
    return code, report


def assert_fails(code: int, report: dict[str, Any], *names: str) -> None:
    failures = report["policy"]["failures"]
    assert code == 1 and report["policy"]["passed"] is False
    for name in names:
        assert any(f.startswith(name) for f in failures), (name, failures)
    # the plain control ran and its attacks worked, whatever was planted in the mode under test
    control = report["results"]["plain (control)"]["llm"]
    assert control["attacks"]["inversion"]["accuracy"] == control["attacks"]["tail_replay"]["accuracy"] == 1.0


def prompt_ids() -> list[int]:
    from lambda_split import encode_prompts, resolve

    ids, _ = encode_prompts(resolve("tiny-random-llama").tokenizer, [PROMPT], chat=False)
    return [int(i) for i in ids[0]]


def test_the_light_configuration_passes_when_nothing_is_planted(capsys: pytest.CaptureFixture[str]) -> None:
    code, report = run(capsys)
    assert code == 0, report["policy"]["failures"]
    assert report["results"]["aesgcm"]["llm"]["completeness"]["complete"]


@pytest.mark.parametrize(
    ("fault", "check"),
    [
        (plants.wrong_port, "capture complete: every client connection captured in both directions"),
        (plants.late_window, "capture complete: TCP handshake and close seen"),
        # the same check as wrong_port, from another fault: test_a_broken_capture_fails_the_run[wrong_port] guards it
        pytest.param(
            plants.one_direction,
            "capture complete: every client connection captured in both directions",
            marks=pytest.mark.exhaustive,
        ),
        (plants.dropped_segments, "capture complete: no sequence holes"),
    ],
)
def test_a_broken_capture_fails_the_run(capsys: pytest.CaptureFixture[str], fault: Any, check: str) -> None:
    code, report = run(capsys, capture_fault=fault, **STREAM_ONLY)
    assert_fails(code, report, f"aesgcm/llm: {check}")
    failure = next(f for f in report["policy"]["failures"] if check in f)
    assert "llm session 0 127.0.0.1:" in failure  # names the session and the connection


def test_an_empty_diffusion_capture_fails_the_run(capsys: pytest.CaptureFixture[str]) -> None:
    code, report = run(
        capsys, capture_fault=plants.empty_diffusion, diffusion=True, diffusion_steps=1, **STREAM_ONLY
    )
    assert_fails(code, report, "aesgcm/diffusion: capture complete: every client connection captured")
    assert all(c["passed"] for c in report["results"]["aesgcm"]["llm"]["checks"])


def test_a_leak_to_another_port_is_a_finding(capsys: pytest.CaptureFixture[str]) -> None:
    sink = plants.SinkServer()
    try:
        code, report = run(capsys, transport_wrapper=lambda t: plants.ExfiltratingTransport(t, sink.port))
    finally:
        sink.close()
    assert_fails(code, report, "aesgcm/llm: no client connection to anywhere but the server")
    assert f"127.0.0.1:{sink.port}" in " ".join(report["policy"]["failures"])


def test_constant_aes_gcm_keys_fail_the_run(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    from secure_channel import _handshake

    monkeypatch.setattr(
        _handshake._Keys, "traffic", lambda self, th: (bytes(range(32)), bytes(range(32, 64)))
    )
    code, report = run(capsys, sessions=2)
    assert_fails(code, report, "aesgcm/llm: aesgcm: fresh keys (no keystream shared between sessions)")


def fp16_be_base64(hidden: np.ndarray) -> tuple[dict[str, str], bytes]:
    return {"x-trace": base64.b64encode(hidden.astype(">f2").tobytes()).decode()}, b""


def test_prefill_hidden_states_in_an_outer_header_fail_twice(capsys: pytest.CaptureFixture[str]) -> None:
    """The audit's fatal case: base64 of fp16 big-endian prefill hidden states in an aesgcm outer header
    (of the next outer HTTP request: the HTTP path has one per step)."""
    code, report = run(
        capsys,
        transport_wrapper=lambda t: plants.SideChannel(t, plants.hidden_leak(fp16_be_base64), "header"),
    )
    assert_fails(
        code,
        report,
        "aesgcm/llm-http: wire allowlist: only the sealed-channel HTTP and stream surface",
        "aesgcm/llm-http: no plaintext hidden-state windows",
    )
    allowlist = next(f for f in report["policy"]["failures"] if "wire allowlist" in f)
    assert "header 'x-trace' is not in the allowlist" in allowlist and "c2s @" in allowlist
    assert any("fp16-be/base64" in e for e in report["results"]["aesgcm"]["llm-http"]["examples"])


STREAM_LEAKS = {
    "upgrade": ("header 'x-trace' is not in the allowlist", "no prompt or output text on the wire"),
    "ping": ("ping message to the server", "no prompt or output text on the wire"),
    "text": ("text message to the server", "no prompt or output text on the wire"),
    "plaintext": ("is not a sealed request record", "no plaintext hidden-state windows", "no frame decodes"),
}


# CI plants the prompt on the upgrade and an unsealed step; a ping and a text frame are further cases of
# the same allowlist (their reasons: tests/threat_model/test_websocket.py, every run).
@pytest.mark.parametrize(
    "how",
    [
        pytest.param(how, marks=pytest.mark.exhaustive) if how in ("ping", "text") else how
        for how in sorted(STREAM_LEAKS)
    ],
)
def test_a_leak_hidden_in_the_stream_is_caught(capsys: pytest.CaptureFixture[str], how: str) -> None:
    """The prompt on the upgrade, in a ping or a text frame, or a step re-sent unsealed: each in the
    WebSocket connection of an aesgcm stream, next to the honest sealed records, fails the run
    (the allowlist names the shape, a detector what leaked); the HTTP path of the same run is clean."""
    reason, *checks = STREAM_LEAKS[how]
    code, report = run(capsys, transport_wrapper=lambda t: plants.StreamLeak(t, how, PROMPT))
    allowlist = "aesgcm/llm: wire allowlist: only the sealed-channel HTTP and stream surface"
    assert_fails(code, report, allowlist, *(f"aesgcm/llm: {c}" for c in checks))
    assert reason in next(f for f in report["policy"]["failures"] if f.startswith(allowlist))
    assert all(c["passed"] for c in report["results"]["aesgcm"]["llm-http"]["checks"])


def test_an_eavesdropper_that_cannot_unmask_fails_the_plain_control(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Client frames are XOR-masked with a key sent next to them: the detectors unmask, as an attacker
    would. Without unmasking, the plain control's check on the masked frames fails the run."""
    from threat_model import _websocket

    monkeypatch.setattr(_websocket, "_unmask", lambda payload, key: payload)
    code, report = run(capsys)
    assert code == 1
    assert any(
        f.startswith("plain (control)/llm: plain: hidden states found inside the masked client-to-server")
        for f in report["policy"]["failures"]
    )


LLM_LEAKS = {
    "hidden fp16 big-endian": (
        lambda h: ({}, h.astype(">f2").tobytes()),
        "no plaintext hidden-state windows",
    ),
    "hidden fp32": (lambda h: ({}, h.astype("<f4").tobytes()), "no plaintext hidden-state windows"),
    "hidden base64 in JSON": (
        lambda h: (
            {"content-type": "application/json"},
            json.dumps({"h": base64.b64encode(h.astype("<f2").tobytes()).decode()}).encode(),
        ),
        "no plaintext hidden-state windows",
    ),
}


# Further encodings of hidden states on the wire: every run plants fp16 big-endian base64 prefill states
# (test_prefill_hidden_states_in_an_outer_header_fail_twice) and unsealed steps on the stream
# (test_a_leak_hidden_in_the_stream_is_caught[plaintext]); the detector reads every float format and
# armour in tests/threat_model/test_detectors.py.
@pytest.mark.exhaustive
@pytest.mark.parametrize("name", sorted(LLM_LEAKS))
def test_hidden_states_in_another_encoding_are_named(capsys: pytest.CaptureFixture[str], name: str) -> None:
    encode, check = LLM_LEAKS[name]
    code, report = run(
        capsys, transport_wrapper=lambda t: plants.SideChannel(t, plants.hidden_leak(encode)), **STREAM_ONLY
    )
    assert_fails(code, report, f"aesgcm/llm: {check}", "aesgcm/llm: wire allowlist")


@pytest.mark.heavy
@pytest.mark.parametrize(
    ("name", "check"),
    [
        ("zlib prompt", "no prompt or output text on the wire"),
        ("space-separated ids", "no token-id sequences on the wire"),
        # the same check as space-separated ids; the encoding: test_detectors.py, every run
        pytest.param("base64 ids", "no token-id sequences on the wire", marks=pytest.mark.exhaustive),
    ],
)
def test_the_prompt_and_its_ids_in_other_encodings_are_named(
    capsys: pytest.CaptureFixture[str], name: str, check: str
) -> None:
    ids = prompt_ids()
    body = {
        "zlib prompt": zlib.compress(PROMPT.encode()),
        "space-separated ids": " ".join(map(str, ids)).encode(),
        "base64 ids": base64.b64encode(np.asarray(ids, "<i4").tobytes()),
    }[name]
    code, report = run(
        capsys, transport_wrapper=lambda t: plants.SideChannel(t, plants.fixed_leak({}, body)), **STREAM_ONLY
    )
    assert_fails(code, report, f"aesgcm/llm: {check}")


@pytest.fixture(scope="module")
def diffusion_image() -> Any:
    """The image the suite's diffusion session renders (seeded, so a leaky build knows it in advance)."""
    import tempfile

    from lambda_split.diffusion import load_diffusion_service, resolve_diffusion
    from threat_model._live import diffusion_session, live_server

    with tempfile.TemporaryDirectory():
        service = load_diffusion_service("tiny-random-sd", security="plain")
        with live_server(
            service, model="tiny-random-sd", split="2:-2", security="plain", keys=None
        ) as server:
            session = diffusion_session(server, "plain", None, resolve_diffusion("tiny-random-sd"),
                                        "a photo of my passport lying on the kitchen table", wire="fp16",
                                        steps=1, guidance=5.0, seed=7, method="auto")  # fmt: skip
    return session


@pytest.mark.heavy
@pytest.mark.parametrize(
    ("name", "check"),
    [
        # the same check as the base64 PNG; images as floats: test_detectors.py, every run
        pytest.param(
            "image float32", "no pixels or encoded images on the wire", marks=pytest.mark.exhaustive
        ),
        ("image base64 PNG", "no pixels or encoded images on the wire"),
        ("prompt token ids", "no prompt token ids on the wire"),
    ],
)
def test_diffusion_leaks_are_named(
    capsys: pytest.CaptureFixture[str], diffusion_image: Any, name: str, check: str
) -> None:
    body = {
        "image float32": np.asarray(diffusion_image.image, dtype="<f4").tobytes(),
        "image base64 PNG": plants.png_base64(diffusion_image.image),
        "prompt token ids": np.asarray(diffusion_image.prompt_ids, "<i4").tobytes(),
    }[name]
    code, report = run(capsys, diffusion=True, diffusion_steps=1, **STREAM_ONLY,
                       transport_wrapper=lambda t: plants.SideChannel(t, plants.fixed_leak({}, body)))  # fmt: skip
    assert_fails(code, report, f"aesgcm/diffusion: {check}")


def test_a_broken_frame_decoder_fails_the_plain_control(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The attacks run on the plain control in every invocation, scored against the client's tokens:
    if the eavesdropper's decoder returned noise, the run fails instead of reporting 0 as a success."""
    import torch

    from threat_model import _modes

    real = _modes.session_tensors

    def noisy(frames: Any) -> tuple[list[Any], list[Any]]:
        sent, back = real(frames)
        return [torch.randn_like(t) for t in sent], [torch.randn_like(t) for t in back]

    monkeypatch.setattr(_modes, "session_tensors", noisy)
    code, report = run(capsys)
    assert code == 1
    failures = report["policy"]["failures"]
    for name in ("exact inversion", "tail replay"):
        assert any(
            f.startswith(f"plain (control)/llm: plain: {name} of the capture recovers 100 %")
            for f in failures
        )
