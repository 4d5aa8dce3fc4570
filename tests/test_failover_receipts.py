"""Failover with signed receipts: every session of a failed-over generation is signed, verified and auditable.

Two replicas serve the same trunk with server keys issued by one CA (each its own certificate). A
step is lost by stopping the first replica just before it (in process, or SIGKILL to a
``lambda-split serve`` subprocess; the :class:`Tripwire` of tests/test_failover.py picks the step,
never timing); the client rebuilds the session on the second replica
and replays the history there. The session before the loss and the replayed one after it must
both be signed step by step, verify against the pinned CA, and pass ``lambda-split audit``.
"""

from __future__ import annotations

import base64
import hashlib
import json
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from lambda_split import Checkpoint, GenerationResult, SplitClient
from lambda_split._audit import audit
from lambda_split._receipts import ClientChain, ReceiptPolicy, StepRecord
from lambda_split._verify import enable_verification
from lambda_split.cli import main
from tests.secure_channel.conftest import PKI
from tests.server.conftest import LiveServer, start_server
from tests.test_failover import (
    PROMPT,
    Faults,
    Replica,
    client_for,
    factory,
    same_answer,
    stopping,
    tokens,
    undisturbed,
)
from threat_model.cheats import cheating_executor

LOCALHOST = ["localhost", "127.0.0.1", "::1"]


class Signed:
    """A chain observer: the sessions opened (id, certificate) and every step whose receipt verified."""

    def __init__(self) -> None:
        self.sessions: list[tuple[str, str]] = []
        self.steps: list[tuple[str, int]] = []

    def opened(self, chain: ClientChain) -> None:
        self.sessions.append((chain.session_id, chain.cert_pem))

    def step(self, chain: ClientChain, record: StepRecord) -> None:
        self.steps.append((chain.session_id, record.seq))


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> PKI:
    return PKI.create(tmp_path_factory.mktemp("failrec-pki"))


@pytest.fixture(scope="module")
def reference(tiny: Checkpoint, pki: PKI) -> GenerationResult:
    """The tokens and logits of an undisturbed run, without receipts."""
    return undisturbed(tiny, pki.root)


@pytest.fixture
def replicas(tiny: Checkpoint, pki: PKI, tmp_path: Path) -> Iterator[Callable[..., LiveServer]]:
    """Starts plain replicas of tiny-random-llama [2:-2], each signing receipts with its own server key
    (a fresh certificate from the one CA in ``pki``); ``executor`` replaces a replica's trunk executor."""
    started: list[LiveServer] = []

    def start(executor: Callable[[Any], Any] | None = None) -> LiveServer:
        keys = pki.issue("server", "server", LOCALHOST, directory=tmp_path / f"replica{len(started)}")
        started.append(start_server(tiny, "plain", keys))
        if executor is not None:
            service = started[-1].service
            service.executor = executor(getattr(service.executor, "trunk"))  # noqa: B009
        return started[-1]

    yield start
    for server in started:
        server.stop()


def verified_client(
    urls: list[str], tiny: Checkpoint, faults: Faults, pki: PKI, transcript: Path | None = None, **kwargs: Any
) -> tuple[SplitClient, Signed, Any]:
    client = client_for(urls, tiny, faults, **kwargs)
    verification = enable_verification(client, keys=pki.root, transcript=transcript)
    signed = Signed()
    policy = verification.policy
    client.receipts = ReceiptPolicy(policy.ca, policy.info, (*policy.observers, signed))
    return client, signed, verification


@pytest.mark.parametrize("transport_kind", ["http", "stream"])
def test_every_step_before_and_after_a_failover_carries_a_receipt_that_verifies(
    replicas: Callable[..., LiveServer],
    tiny: Checkpoint,
    pki: PKI,
    reference: GenerationResult,
    transport_kind: str,
) -> None:
    first, second = replicas(), replicas()
    faults = Faults(hooks={5: stopping(first)})
    client, signed, _ = verified_client(
        [first.url, second.url], tiny, faults, pki, transport_kind=transport_kind
    )
    with client:
        assert same_answer(tokens(client), reference)
        assert client.failovers == 1 and client.url == second.url
    # Two sessions, signed by the two replicas' own certificates.
    assert len(signed.sessions) == 2
    (before, before_cert), (after, after_cert) = signed.sessions
    assert before != after and before_cert != after_cert
    # Every step that reached a server was verified (the 5th never left), each session from seq 0.
    assert len(signed.steps) == faults.steps - 1
    seqs = {session: [seq for s, seq in signed.steps if s == session] for session, _ in signed.sessions}
    assert seqs[before] == [0, 1, 2, 3]  # the prompt and 3 decode steps, then the loss
    # The replay (one prefill of the history, prompt + 3 tokens), the lost step re-run, the rest.
    assert seqs[after] == list(range(1 + 1 + reference.new_tokens - 5))


def test_a_session_the_server_forgot_is_signed_again_on_the_same_server(
    tiny: Checkpoint, pki: PKI, reference: GenerationResult, tmp_path: Path
) -> None:
    """A restart behind one URL, or an idle expiry: 404, a new signed session on the same server."""
    server = start_server(tiny, "plain", pki.root, idle_timeout_s=60)
    try:
        now = [0.0]
        server.service._clock = lambda: now[0]

        def forget() -> None:
            now[0] += 61
            assert server.service.expire_idle() == 1

        faults = Faults(hooks={4: forget})
        path = tmp_path / "run.jsonl"
        client, signed, verification = verified_client([server.url], tiny, faults, pki, path)
        with client:
            assert same_answer(tokens(client), reference)
            assert client.failovers == 1
        verification.close()
    finally:
        server.stop()
    assert len(signed.sessions) == 2 and signed.sessions[0][1] == signed.sessions[1][1]
    assert len(signed.steps) == faults.steps - 1  # all but the forgotten step (a 404, nothing to sign)
    report = audit(path, "tiny-random-llama", ca_pem=(pki.root / "ca.pem").read_bytes())
    assert report["verdict"] == "pass" and len(report["sessions"]) == 2


def record_failover(
    replicas: Callable[..., LiveServer],
    tiny: Checkpoint,
    pki: PKI,
    path: Path,
    monkeypatch: pytest.MonkeyPatch,
    *extra: str,
    executor: Callable[[Any], Any] | None = None,
) -> int:
    """``lambda-split generate --transcript path`` over two replicas, the first stopped before step 5."""
    first, second = replicas(), replicas(executor)
    faults = Faults(hooks={5: stopping(first)})
    connect = SplitClient.connect
    monkeypatch.setattr(
        SplitClient,
        "connect",
        lambda *args, **kwargs: connect(*args, transport_factory=factory(faults), **kwargs),
    )
    argv = ["generate", "--server", first.url, "--server", second.url, "--security", "plain"]
    argv += ["--keys", str(pki.root), "--model", "tiny-random-llama", "--max-new-tokens", "12"]
    return main([*argv, "--json", "--transcript", str(path), *extra, PROMPT])


def audit_cli(path: Path, pki: PKI, capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    capsys.readouterr()
    code = main(["audit", str(path), "--model", "tiny-random-llama", "--keys", str(pki.root), "--json"])
    out, err = capsys.readouterr()
    return code, out, err


def test_the_transcript_of_a_failed_over_generation_audits_clean_and_a_tampered_step_fails(
    replicas: Callable[..., LiveServer],
    tiny: Checkpoint,
    pki: PKI,
    reference: GenerationResult,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    path = tmp_path / "run.jsonl"
    # --verify-rate 1: the spot checker replays the new session from its own start as well.
    assert record_failover(replicas, tiny, pki, path, monkeypatch, "--verify-rate", "1") == 0
    out, err = capsys.readouterr()
    data = json.loads(out)
    assert data["token_ids"] == reference.token_ids[0] and data["stats"]["failovers"] == 1
    assert "failed over to" in err

    code, out, _ = audit_cli(path, pki, capsys)
    assert code == 0
    report = json.loads(out)
    assert report["verdict"] == "pass" and report["failed_steps"] == 0
    assert [len(s["steps"]) for s in report["sessions"]] == [4, 1 + 1 + reference.new_tokens - 5]
    assert report["audited_steps"] == report["steps"] == 4 + 2 + reference.new_tokens - 5

    # Positive control: one step's result in the replayed session, changed (its hash with it).
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    replayed = lines[1 + 1 + 4]["session_id"]  # header, first session, its 4 steps, second session
    step = next(line for line in lines if line.get("session_id") == replayed and line.get("seq") == 2)
    output = bytearray(base64.b64decode(step["output"]))
    output[80] ^= 0x01  # inside the hidden payload
    step["output"] = base64.b64encode(bytes(output)).decode()
    step["result_sha256"] = hashlib.sha256(bytes(output)).hexdigest()
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    code, _, err = audit_cli(path, pki, capsys)
    assert code == 4  # the receipts do not verify: nothing in the file can be attributed to the servers
    assert "signature does not verify" in err and "Traceback" not in err


def test_a_cheating_replica_that_took_over_fails_the_audit(
    replicas: Callable[..., LiveServer],
    tiny: Checkpoint,
    pki: PKI,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """The replayed session is really replayed by the audit: a second replica that skips the trunk's
    layers signs what it returns, and the audit finds its steps, and only its steps, wrong (exit 5)."""
    path = tmp_path / "run.jsonl"

    def skip(trunk: Any) -> Any:
        return cheating_executor("skip", trunk)

    assert record_failover(replicas, tiny, pki, path, monkeypatch, executor=skip) == 0
    code, out, _ = audit_cli(path, pki, capsys)
    assert code == 5
    report = json.loads(out)
    honest, cheated = report["sessions"]
    assert all(v["match"] for v in honest["steps"])
    assert not any(v["match"] for v in cheated["steps"])


class SigningReplica(Replica):
    """:class:`Replica` (``lambda-split serve``, plain, in a subprocess) signing receipts with ``keys``."""

    def __init__(self, keys: Path) -> None:
        command = [sys.executable, "-m", "lambda_split", "serve", "--model", "tiny-random-llama"]
        command += ["--split", "2:-2", "--security", "plain", "--keys", str(keys), "--port", "0"]
        self.process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        self.url = ""


@pytest.mark.heavy
def test_kill_9_mid_generation_keeps_every_session_signed_and_auditable(
    tiny: Checkpoint, pki: PKI, reference: GenerationResult, tmp_path: Path
) -> None:
    started: list[Replica] = []
    try:
        for name in ("a", "b"):
            started.append(
                SigningReplica(pki.issue("server", "server", LOCALHOST, directory=tmp_path / name))
            )
        first, second = (replica.wait() for replica in started)
        faults = Faults(hooks={5: first.kill})
        path = tmp_path / "run.jsonl"
        urls = [first.url, second.url]
        client, signed, verification = verified_client(urls, tiny, faults, pki, path, transport_kind="stream")
        with client:
            assert same_answer(tokens(client), reference)
            assert client.failovers == 1 and client.url == second.url
        verification.close()
    finally:
        for replica in started:
            replica.stop()
    assert len(signed.sessions) == 2 and signed.sessions[0][1] != signed.sessions[1][1]
    assert len(signed.steps) == faults.steps - 1
    report = audit(path, "tiny-random-llama", ca_pem=(pki.root / "ca.pem").read_bytes())
    assert report["verdict"] == "pass" and report["audited_steps"] == len(signed.steps)
    assert [s["session_id"] for s in report["sessions"]] == [session for session, _ in signed.sessions]
