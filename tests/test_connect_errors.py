"""A client that cannot work with a server says why and what to pass instead, with the contract's exit code."""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import lambda_split.cli as cli
from lambda_split import (
    Checkpoint,
    FingerprintMismatch,
    LocalTransport,
    ModeMismatch,
    SplitClient,
    SplitSpec,
    TrunkService,
    load_parts,
)
from lambda_split._llm_trunk import LLMExecutor
from lambda_split.protocol import PROTOCOL_VERSION
from secure_channel import AuthenticationError, ServerBusy, TransportError, generate_credentials
from tests.server.conftest import LiveServer, start_server

MODES = ("plain", "tls", "aesgcm", "tls+aesgcm")
TLS = ("tls", "tls+aesgcm")


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("keys")
    generate_credentials(directory, days=1)
    return directory


@pytest.fixture(scope="module")
def other_ca(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("other-ca")
    generate_credentials(directory, days=1)
    return directory


@pytest.fixture(scope="module")
def servers(tiny: Checkpoint, keys: Path) -> Iterator[dict[str, LiveServer]]:
    running = {mode: start_server(tiny, mode, keys) for mode in MODES}
    yield running
    for server in running.values():
        server.stop()


def url_for(server: LiveServer, client_mode: str) -> str:
    """The server's address with the scheme the client's mode needs (the CLI refuses any other)."""
    return ("https" if client_mode in TLS else "http") + server.url[server.url.index(":") :]


@pytest.mark.parametrize(("server_mode", "client_mode"), list(itertools.permutations(MODES, 2)))
def test_a_mode_mismatch_names_the_servers_mode_and_the_fix(
    servers: dict[str, LiveServer], keys: Path, tiny: Checkpoint, server_mode: str, client_mode: str
) -> None:
    url = url_for(servers[server_mode], client_mode)
    with pytest.raises(ModeMismatch) as caught:
        SplitClient.connect(
            url, security=client_mode, keys=None if client_mode == "plain" else keys, model=tiny, timeout=10
        )  # type: ignore[arg-type]
    message = str(caught.value)
    if client_mode == "plain" and server_mode in TLS:  # without keys, TLS is all that can be seen
        assert "speaks TLS" in message and "--security tls or tls+aesgcm" in message
    else:
        assert f"is in mode {server_mode}, not {client_mode}; pass --security {server_mode}" in message
    if (server_mode in TLS) != (client_mode in TLS):
        scheme = "https" if server_mode in TLS else "http"
        assert f"--server {scheme}://127.0.0.1:" in message


@pytest.mark.parametrize("mode", ["tls", "aesgcm", "tls+aesgcm"])
def test_keys_from_another_ca_are_named(
    servers: dict[str, LiveServer], other_ca: Path, tiny: Checkpoint, mode: str
) -> None:
    with pytest.raises(AuthenticationError) as caught:
        SplitClient.connect(servers[mode].url, security=mode, keys=other_ca, model=tiny, timeout=10)  # type: ignore[arg-type]
    assert f"not issued by the CA in {other_ca / 'ca.pem'}" in str(caught.value)


def test_nothing_listening_says_so() -> None:
    with pytest.raises(TransportError, match=r"nothing answers at http://127\.0\.0\.1:9 .*server running"):
        SplitClient.connect("http://127.0.0.1:9", security="plain", model="tiny-random-llama", timeout=5)


def test_a_busy_server_is_not_probed_for_its_mode() -> None:
    """ServerBusy means the server answered in our mode; a probe would only add load (and here,
    with nothing listening, would turn the error into "nothing answers")."""
    from lambda_split._diagnose import explain

    busy = ServerBusy("the server refused the handshake for now (overloaded, 5 attempts)", retry_after=1.0)
    assert explain(busy, "http://127.0.0.1:9", "aesgcm", None, 1.0) is None
    assert cli.exit_code(busy) == 4


@pytest.mark.parametrize(
    ("server_mode", "client_mode", "extra", "code", "expected"),
    [
        ("aesgcm", "plain", [], 3, "is in mode aesgcm, not plain; pass --security aesgcm"),
        ("tls+aesgcm", "tls", ["--keys", "KEYS"], 3, "is in mode tls+aesgcm, not tls"),
        ("tls", "tls", ["--keys", "OTHER"], 3, "was not issued by the CA in"),
    ],
)
def test_the_cli_prints_one_line_and_exits_with_the_contract_code(
    servers: dict[str, LiveServer],
    keys: Path,
    other_ca: Path,
    capsys: pytest.CaptureFixture[str],
    server_mode: str,
    client_mode: str,
    extra: list[str],
    code: int,
    expected: str,
) -> None:
    extra = [str(keys) if a == "KEYS" else str(other_ca) if a == "OTHER" else a for a in extra]
    argv = ["generate", "--server", url_for(servers[server_mode], client_mode), "--security", client_mode]
    assert cli.main([*argv, *extra, "--model", "tiny-random-llama", "hi"]) == code
    err = capsys.readouterr().err.splitlines()
    assert err[-1].startswith("lambda-split: error: ") and expected in err[-1]
    assert not any("Traceback" in line for line in err)


def info_for(model: str, layers: int, split: list[int]) -> dict[str, Any]:
    return {
        "model": model,
        "fingerprint": "sha256:00",
        "split": split,
        "num_layers": layers,
        "hidden_size": 64,
        "security": "plain",
        "protocol_version": PROTOCOL_VERSION,
    }


def trunk_service(tiny: Checkpoint) -> TrunkService:
    trunk = load_parts(tiny, SplitSpec(2, 6, 8), ("trunk",)).trunk
    return TrunkService(LLMExecutor(trunk))  # type: ignore[arg-type]


def test_a_model_mismatch_names_both_models_and_layer_counts(tiny: Checkpoint) -> None:
    service = trunk_service(tiny)
    transport = LocalTransport(service, info_for("smollm2-135m", 30, [2, 28]))
    with pytest.raises(FingerprintMismatch) as caught:
        SplitClient.from_transport(transport, tiny)
    assert "smollm2-135m (30 layers)" in str(caught.value) and "tiny-random-llama (8 layers)" in str(
        caught.value
    )


def test_an_expected_split_that_differs_is_refused_before_any_hidden_state(tiny: Checkpoint) -> None:
    service = trunk_service(tiny)
    transport = LocalTransport(service, info_for("tiny-random-llama", 8, [2, 6]))
    with pytest.raises(FingerprintMismatch, match=r"runs split 2:6 of 8 layers, not 1:-1 \(1:7\)"):
        SplitClient.from_transport(transport, tiny, split="1:-1")
