"""Signed step receipts, transcripts and audits, in process (LocalTransport, tiny model)."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from lambda_split import Checkpoint, LocalTransport, ServerError
from lambda_split._audit import AuditFailed, audit
from lambda_split._codec import decode_frame
from lambda_split._generate import GenerationConfig
from lambda_split._llm_trunk import LLMExecutor
from lambda_split._receipts import ReceiptError, ReceiptSigner
from lambda_split._transcript import TranscriptError
from lambda_split._verify import enable_verification
from secure_channel import Request, Response, Transport, generate_credentials, load_credentials
from tests.helpers import local_client
from threat_model.cheats import cheating_executor

GREEDY = GenerationConfig(max_new_tokens=6, stop_on_eos=False)


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("receipt-keys") / "keys"
    generate_credentials(root)
    return root


@pytest.fixture(scope="module")
def other_keys(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("other-keys") / "keys"
    generate_credentials(root)
    return root


class Tamper(Transport):
    """Passes requests to ``inner`` and lets ``edit`` rewrite each step reply."""

    security = "plain"

    def __init__(self, inner: LocalTransport, edit: Callable[[int, bytes], bytes]) -> None:
        self.inner = inner
        self.edit = edit
        self.steps = 0

    def exchange(self, request: Request) -> Response:
        response = self.inner.exchange(request)
        if request.path.endswith("/step") and response.status == 200:
            self.steps += 1
            return Response(200, self.edit(self.steps, response.content), response.headers)
        return response


def client_for(
    tiny: Checkpoint,
    keys: Path,
    *,
    wire: str = "fp32",
    signer_keys: Path | None = None,
    executor: Any = None,
    split: str = "2:-2",
) -> Any:
    client, service = local_client(tiny, split, wire=wire)
    if executor is not None:
        service.executor = executor(getattr(service.executor, "trunk"))  # noqa: B009
    credentials = load_credentials(signer_keys or keys, "server")
    service.receipts = ReceiptSigner(lambda: credentials, getattr(client.transport, "info"))  # noqa: B009
    return client, service


def test_receipts_verify_every_step(tiny: Checkpoint, keys: Path) -> None:
    client, _ = client_for(tiny, keys)
    seen: list[int] = []

    class Count:
        def opened(self, chain: Any) -> None:
            pass

        def step(self, chain: Any, record: Any) -> None:
            seen.append(record.seq)

    verification = enable_verification(client, keys=keys)
    client.receipts = type(verification.policy)(verification.policy.ca, verification.policy.info, (Count(),))
    result = client.generate("hello", GREEDY)
    assert result.new_tokens == 6
    assert seen == list(range(6))


def test_a_server_without_a_key_refuses_receipts(tiny: Checkpoint, keys: Path) -> None:
    client, _ = local_client(tiny, "2:-2")
    enable_verification(client, keys=keys)
    with pytest.raises(ServerError) as caught:
        client.generate("hello", GREEDY)
    assert caught.value.code == "receipts_unavailable"


def flip_hidden_byte(_step: int, frame: bytes) -> bytes:
    data = bytearray(frame)
    data[80] ^= 0x01  # inside the hidden payload (header 32 + descriptor)
    return bytes(data)


def strip_receipt(_step: int, frame: bytes) -> bytes:
    from lambda_split._receipts import split_receipt

    return split_receipt(frame)[0]


def forge_signature(_step: int, frame: bytes) -> bytes:
    data = bytearray(frame)
    data[-5] ^= 0x40
    return bytes(data)


@pytest.mark.parametrize("edit", [flip_hidden_byte, strip_receipt, forge_signature], ids=lambda f: f.__name__)
def test_a_tampered_reply_is_rejected(
    tiny: Checkpoint, keys: Path, edit: Callable[[int, bytes], bytes]
) -> None:
    client, _ = client_for(tiny, keys)
    client.transport = client.link.transport = Tamper(
        client.transport, lambda n, f: edit(n, f) if n == 3 else f
    )
    enable_verification(client, keys=keys)
    with pytest.raises(ReceiptError):
        client.generate("hello", GREEDY)


def test_a_replayed_step_is_rejected(tiny: Checkpoint, keys: Path) -> None:
    replies: list[bytes] = []

    def replay(step: int, frame: bytes) -> bytes:
        replies.append(frame)
        return replies[1] if step == 4 else frame  # step 3's signed answer again

    client, _ = client_for(tiny, keys)
    client.transport = client.link.transport = Tamper(client.transport, replay)
    enable_verification(client, keys=keys)
    with pytest.raises(ReceiptError):
        client.generate("hello", GREEDY)


def test_a_certificate_from_another_ca_is_refused(tiny: Checkpoint, keys: Path, other_keys: Path) -> None:
    client, service = client_for(tiny, keys, signer_keys=other_keys)
    enable_verification(client, keys=keys)
    with pytest.raises(ReceiptError, match="receipt certificate refused"):
        client.generate("hello", GREEDY)
    assert service.open_sessions == 0, "the session opened before the refusal is closed"


def record(
    tiny: Checkpoint, keys: Path, path: Path, *, wire: str = "fp32", executor: Any = None, split: str = "2:-2"
) -> Path:
    client, _ = client_for(tiny, keys, wire=wire, executor=executor, split=split)
    verification = enable_verification(client, keys=keys, transcript=path)
    client.generate("Tell me about rivers.", GenerationConfig(max_new_tokens=8, stop_on_eos=False))
    verification.close()
    return path


@pytest.mark.parametrize("wire", ["fp32", "fp16", "bf16", "int8"])
def test_audit_passes_an_honest_transcript(tiny: Checkpoint, keys: Path, tmp_path: Path, wire: str) -> None:
    path = record(tiny, keys, tmp_path / "t.jsonl", wire=wire)
    report = audit(path, "tiny-random-llama", ca_pem=(keys / "ca.pem").read_bytes())
    assert report["verdict"] == "pass"
    assert report["audited_steps"] == report["steps"] == 8
    assert report["ca_source"] == "given"
    assert path.stat().st_mode & 0o777 == 0o600


def test_each_session_is_audited_on_its_own_signed_span(tiny: Checkpoint, keys: Path, tmp_path: Path) -> None:
    first = record(tiny, keys, tmp_path / "a.jsonl").read_text().splitlines()
    second = record(tiny, keys, tmp_path / "b.jsonl", split="1:-1").read_text().splitlines()
    both = tmp_path / "both.jsonl"
    both.write_text("\n".join([*first, *second[1:]]) + "\n")  # one header, two sessions
    report = audit(both, "tiny-random-llama", ca_pem=(keys / "ca.pem").read_bytes())
    assert [s["context"]["split"] for s in report["sessions"]] == [[2, 6], [1, 7]]
    assert report["verdict"] == "pass" and report["audited_steps"] == 16


def test_an_expired_certificate_still_lets_its_signatures_be_audited(
    tiny: Checkpoint, keys: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import datetime as dt

    import secure_channel._keys

    path = record(tiny, keys, tmp_path / "t.jsonl")
    later = dt.datetime.now(dt.UTC) + dt.timedelta(days=3650)
    monkeypatch.setattr(secure_channel._keys, "_now", lambda: later)  # long after the server cert expired
    report = audit(path, "tiny-random-llama", ca_pem=(keys / "ca.pem").read_bytes())
    assert report["verdict"] == "pass" and report["receipts"] == "valid"


@pytest.mark.parametrize("cheat", ["skip", "int4", "perturb", "noise", "replay"])
def test_a_full_audit_catches_each_cheat(tiny: Checkpoint, keys: Path, tmp_path: Path, cheat: str) -> None:
    options = {"noise": {"fraction": 0.3, "seed": 1}}.get(cheat, {})
    path = record(tiny, keys, tmp_path / "t.jsonl", executor=lambda t: cheating_executor(cheat, t, **options))
    report = audit(path, "tiny-random-llama")
    assert report["verdict"] == "fail"
    assert report["failed_steps"] >= 1
    failing = [v for v in report["sessions"][0]["steps"] if v.get("match") is False]
    assert all(v["deviation"] > v["tolerance"] for v in failing)


def edit_transcript(path: Path, edit: Callable[[list[dict[str, Any]]], None]) -> None:
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    edit(lines)
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))


def swap_steps(lines: list[dict[str, Any]]) -> None:
    lines[3], lines[4] = lines[4], lines[3]


def change_output(lines: list[dict[str, Any]]) -> None:
    import base64

    from lambda_split._codec import Encoding, encode_frame

    step = lines[4]
    frame = decode_frame(base64.b64decode(step["output"]))
    hidden = frame.tensors["hidden"] * 1.5
    forged = encode_frame(frame.kind, frame.session_id, frame.seq, {"hidden": (hidden, Encoding.FP32)})
    step["output"] = base64.b64encode(forged).decode()
    import hashlib

    step["result_sha256"] = hashlib.sha256(forged).hexdigest()


def drop_step(lines: list[dict[str, Any]]) -> None:
    del lines[3]


@pytest.mark.parametrize("edit", [swap_steps, change_output, drop_step], ids=lambda f: f.__name__)
def test_an_edited_transcript_does_not_verify(
    tiny: Checkpoint, keys: Path, tmp_path: Path, edit: Callable[[list[dict[str, Any]]], None]
) -> None:
    path = record(tiny, keys, tmp_path / "t.jsonl")
    assert audit(path, "tiny-random-llama")["verdict"] == "pass"
    edit_transcript(path, edit)
    with pytest.raises(ReceiptError):
        audit(path, "tiny-random-llama")


def test_audit_against_another_ca_fails(
    tiny: Checkpoint, keys: Path, other_keys: Path, tmp_path: Path
) -> None:
    path = record(tiny, keys, tmp_path / "t.jsonl")
    with pytest.raises(ReceiptError):
        audit(path, "tiny-random-llama", ca_pem=(other_keys / "ca.pem").read_bytes())


def test_a_malformed_transcript_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "t.jsonl"
    path.write_text('{"format": "something-else"}\n')
    with pytest.raises(TranscriptError):
        audit(path, "tiny-random-llama")


def test_spot_checks_stop_a_cheating_server(tiny: Checkpoint, keys: Path, tmp_path: Path) -> None:
    client, _ = client_for(tiny, keys, executor=lambda t: cheating_executor("skip", t))
    verification = enable_verification(client, keys=keys, verify_rate=1.0, transcript=tmp_path / "t.jsonl")
    with pytest.raises(AuditFailed, match="spot check failed: step 0"):
        client.generate("hello", GREEDY)
    verification.close()
    assert audit(tmp_path / "t.jsonl", "tiny-random-llama")["verdict"] == "fail"  # the step is on file


def test_spot_checks_pass_an_honest_server(tiny: Checkpoint, keys: Path) -> None:
    client, _ = client_for(tiny, keys, executor=LLMExecutor)
    verification = enable_verification(client, keys=keys, verify_rate=1.0)
    client.generate("hello", GREEDY)
    assert verification.checker is not None and verification.checker.checked == 6


def test_a_partial_transcript_keeps_every_input_and_some_outputs(
    tiny: Checkpoint, keys: Path, tmp_path: Path
) -> None:
    import random

    client, _ = client_for(tiny, keys, executor=lambda t: cheating_executor("skip", t))
    path = tmp_path / "t.jsonl"
    verification = enable_verification(
        client, keys=keys, transcript=path, audit_rate=0.5, rng=random.Random(3)
    )
    client.generate("hello", GenerationConfig(max_new_tokens=8, stop_on_eos=False))
    verification.close()
    report = audit(path, "tiny-random-llama")
    assert 0 < report["audited_steps"] < report["steps"] == 8  # the chain verifies over hashes alone
    assert report["failed_steps"] == report["audited_steps"]  # every step of this cheat is wrong
