"""Receipts over a real server: an honest server audits clean in every mode and wire encoding, a cheating server is caught live."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from lambda_split import Checkpoint, load_llm_service
from lambda_split.cli import main
from server import BackgroundServer, ServerConfig
from tests.secure_channel.conftest import PKI
from tests.server.conftest import MODES, LiveServer
from threat_model.cheats import cheating_executor


def generate(url: str, mode: str, keys: Path, *extra: str) -> int:
    return main(["generate", "--server", url, "--security", mode, "--keys", str(keys), "--model",
                 "tiny-random-llama", "--max-new-tokens", "6", "--json", *extra, "hello"])  # fmt: skip


@pytest.fixture
def cheating_server(tiny: Checkpoint, server_pki: PKI) -> Iterator[str]:
    service, info = load_llm_service(tiny, "2:-2", security="plain")
    service.executor = cheating_executor("skip", getattr(service.executor, "trunk"))  # noqa: B009
    config = ServerConfig(model=tiny.name, split="2:-2", security="plain", keys=str(server_pki.root), port=0)
    running = BackgroundServer(config, (service, info))
    yield running.url
    running.stop()


@pytest.mark.parametrize("wire", ["fp32", "fp16", "bf16", "int8"])
@pytest.mark.parametrize("mode", MODES)
def test_an_honest_server_passes_the_audit_in_every_mode_and_wire_encoding(
    live: dict[str, LiveServer], mode: str, wire: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    server = live[mode]
    transcript = tmp_path / "run.jsonl"
    assert generate(server.url, mode, server.keys, "--wire", wire, "--transcript", str(transcript)) == 0
    capsys.readouterr()
    assert (
        main(["audit", str(transcript), "--model", "tiny-random-llama", "--keys", str(server.keys), "--json"])
        == 0
    )
    report = json.loads(capsys.readouterr().out)
    assert report["verdict"] == "pass" and report["steps"] == 6 and report["ca_source"] == "given"
    assert report["audited_steps"] == 6 and report["failed_steps"] == 0
    assert [s["context"]["wire"] for s in report["sessions"]] == [wire]


def test_verify_rate_one_stops_a_cheating_server(
    cheating_server: str, server_pki: PKI, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    transcript = tmp_path / "run.jsonl"
    code = generate(
        cheating_server, "plain", server_pki.root, "--verify-rate", "1", "--transcript", str(transcript)
    )
    assert code == 5
    assert "spot check failed" in capsys.readouterr().err
    # The failed step is on file, signed: anyone with the CA and the weights reaches the same verdict.
    assert (
        main(
            [
                "audit",
                str(transcript),
                "--model",
                "tiny-random-llama",
                "--keys",
                str(server_pki.root),
                "--json",
            ]
        )
        == 5
    )
    report = json.loads(capsys.readouterr().out)
    assert report["verdict"] == "fail" and report["failed_steps"] >= 1
    loose = ["audit", str(transcript), "--model", "tiny-random-llama", "--tolerance", "1000"]
    assert main(loose) == 0  # the verdict is the tolerance's: an auditor who widens it accepts anything
    capsys.readouterr()
    lines = transcript.read_text().splitlines()
    transcript.write_text(
        "\n".join([*lines[:-1], lines[-1].replace('"signature":"M', '"signature":"N')]) + "\n"
    )
    assert main(["audit", str(transcript), "--model", "tiny-random-llama"]) == 4
    assert "signature does not verify" in capsys.readouterr().err


def test_receipts_without_keys_is_a_usage_error(
    cheating_server: str, capsys: pytest.CaptureFixture[str]
) -> None:
    code = main(["generate", "--server", cheating_server, "--security", "plain", "--model", "tiny-random-llama",
                 "--receipts", "hello"])  # fmt: skip
    assert code == 2
    assert "need --keys" in capsys.readouterr().err


def test_a_plain_server_without_valid_keys_serves_but_signs_nothing(
    tiny: Checkpoint, server_pki: PKI, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    service = load_llm_service(tiny, "2:-2", security="plain")
    config = ServerConfig(model=tiny.name, split="2:-2", security="plain", keys=str(tmp_path), port=0)
    running = BackgroundServer(config, service)
    try:
        assert generate(running.url, "plain", server_pki.root) == 0
        assert generate(running.url, "plain", server_pki.root, "--receipts") == 4
        assert "receipts_unavailable" in capsys.readouterr().err
    finally:
        running.stop()
