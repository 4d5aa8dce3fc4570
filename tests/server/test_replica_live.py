"""The audit replica (issue 17's second auditor): spot checks and audits replayed on another trunk server."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from lambda_split import Checkpoint
from lambda_split._audit import audit as audit_library
from lambda_split._replica import ReplicaMismatch, connect_replica
from lambda_split.cli import main
from tests.secure_channel.conftest import PKI
from tests.server.conftest import LiveServer, start_server
from threat_model.cheats import cheating_executor

MODEL = "tiny-random-llama"


def generate(server: LiveServer, *extra: str) -> int:
    return main(["generate", "--server", server.url, "--security", server.mode, "--keys", str(server.keys),
                 "--model", MODEL, "--max-new-tokens", "5", "--json", *extra, "hello"])  # fmt: skip


def audit(transcript: Path, replica: LiveServer, *extra: str) -> int:
    return main(["audit", str(transcript), "--model", MODEL, "--keys", str(replica.keys), "--server", replica.url,
                 "--security", replica.mode, "--json", *extra])  # fmt: skip


@pytest.fixture
def servers(tiny: Checkpoint, server_pki: PKI) -> Iterator[Callable[..., LiveServer]]:
    """``servers(mode, split=..., cheat=...)``: a trunk server on loopback, stopped after the test."""
    started: list[LiveServer] = []

    def make(mode: str = "plain", split: str = "2:-2", cheat: str | None = None) -> LiveServer:
        server = start_server(tiny, mode, server_pki.root, split)
        started.append(server)
        if cheat is not None:
            server.service.executor = cheating_executor(cheat, getattr(server.service.executor, "trunk"))  # noqa: B009
        return server

    yield make
    for server in started:
        server.stop()


def test_an_honest_replica_passes_an_honest_server_online_and_offline(
    servers: Callable[..., LiveServer], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    main_server, replica = servers("tls+aesgcm"), servers("tls+aesgcm")
    transcript = tmp_path / "run.jsonl"
    extra = ("--wire", "int8", "--transcript", str(transcript))
    assert generate(main_server, "--verify-rate", "1", "--audit-server", replica.url, *extra) == 0
    assert "on the audit replica" in capsys.readouterr().err
    assert replica.service.open_sessions == 0 and main_server.service.open_sessions == 0
    assert audit(transcript, replica) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["verdict"] == "pass" and report["audited_steps"] == report["steps"] == 5
    assert report["auditor"] == f"replica {replica.url}"
    assert replica.service.open_sessions == 0
    # Each replica session ends with its audited session's replay, not only when the replica is closed.
    with connect_replica(replica.url, security="tls+aesgcm", keys=replica.keys) as remote:
        assert audit_library(transcript, MODEL, replica=remote)["verdict"] == "pass"
        assert remote.steps == 5 and remote.open_sessions == 0 and replica.service.open_sessions == 0


def test_a_cheating_server_is_caught_by_an_honest_replica(
    servers: Callable[..., LiveServer], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cheat, replica = servers(cheat="skip"), servers()
    transcript = tmp_path / "run.jsonl"
    code = generate(
        cheat, "--verify-rate", "1", "--audit-server", replica.url, "--transcript", str(transcript)
    )
    assert code == 5
    assert "spot check failed" in capsys.readouterr().err
    assert replica.service.open_sessions == 0
    assert audit(transcript, replica) == 5
    report = json.loads(capsys.readouterr().out)
    assert report["verdict"] == "fail" and report["failed_steps"] >= 1
    assert replica.service.open_sessions == 0


def test_a_cheating_replica_accuses_an_honest_server(
    servers: Callable[..., LiveServer], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The replica is the judge: its word is only as good as its honesty (SECURITY.md)."""
    honest, liar = servers(), servers(cheat="skip")
    assert generate(honest, "--verify-rate", "1", "--audit-server", liar.url) == 5
    assert "spot check failed" in capsys.readouterr().err
    assert liar.service.open_sessions == 0


def test_a_replica_of_another_split_is_refused_before_any_hidden_state(
    servers: Callable[..., LiveServer], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    main_server, other = servers(), servers(split="3:-2")
    transcript = tmp_path / "run.jsonl"
    assert generate(main_server, "--verify-rate", "1", "--audit-server", other.url) == 4
    err = capsys.readouterr().err
    assert "audit replica" in err and "serves split 3:" in err
    assert generate(main_server, "--transcript", str(transcript)) == 0
    capsys.readouterr()
    assert audit(transcript, other) == 4
    assert "serves split 3:" in capsys.readouterr().err
    assert other.service.open_sessions == 0
    replica = connect_replica(main_server.url, security="plain", keys=main_server.keys)
    with replica, pytest.raises(ReplicaMismatch, match="signed for sha256:0"):
        replica.check({"fingerprint": "sha256:0", "split": replica.info.split})
    assert main(["generate", "--server", main_server.url, "--security", "plain", "--keys", str(main_server.keys),
                 "--model", MODEL, "--audit-server", other.url, "hello"]) == 2  # fmt: skip
    assert "--verify-rate" in capsys.readouterr().err
