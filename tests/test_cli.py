"""The command line as CONTRACT.md fixes it, run as a user runs it: in a subprocess.

What only a process shows stays in a subprocess: the ``listening on`` line and SIGTERM of
``serve``, the JSON on stdout, the prompt on stdin, the exit statuses. The other cases call
:func:`lambda_split.cli.main` in this process (the same parser and commands), because each new
interpreter imports torch and transformers: seconds each on a loaded machine.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from lambda_split import GenerationConfig
from lambda_split.cli import main
from tests.helpers import local_client

CLI = [sys.executable, "-m", "lambda_split"]


def run(*args: str, stdin: str | None = None, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*CLI, *args], input=stdin, capture_output=True, text=True, timeout=timeout)


def run_here(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    """``lambda-split ARGS`` through :func:`main` in this process; usage errors exit as argparse makes them."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err), pytest.MonkeyPatch.context() as mp:
        if stdin is not None:
            mp.setattr(sys, "stdin", io.StringIO(stdin))
        try:
            code = main(list(args))
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else 1
    return subprocess.CompletedProcess(list(args), code, out.getvalue(), err.getvalue())


def start_serve(keys: Path) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [*CLI, "serve", "--model", "tiny-random-llama", "--split", "2:-2", "--security", "tls+aesgcm",
         "--keys", str(keys), "--port", "0"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )  # fmt: skip


def listening_url(process: subprocess.Popen[str]) -> str:
    assert process.stdout is not None
    line = process.stdout.readline()
    assert line.startswith("listening on https://127.0.0.1:"), line
    return line.split()[-1]


def stop(process: subprocess.Popen[str]) -> None:
    if process.poll() is None:
        process.kill()
    process.communicate(timeout=30)


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("keys")
    assert run_here("keys", "init", str(directory), "--days", "2").returncode == 0
    return directory


@pytest.fixture(scope="module")
def served(keys: Path) -> Iterator[tuple[subprocess.Popen[str], str]]:
    """One ``serve`` process that the tests only read from (SIGTERM has a server of its own)."""
    process = start_serve(keys)
    try:
        yield process, listening_url(process)
    finally:
        stop(process)


def test_keys_init_writes_the_five_files_and_refuses_to_overwrite(tmp_path: Path) -> None:
    keys = tmp_path / "keys"  # its own: --force below must not replace the CA the module's server trusts
    assert run_here("keys", "init", str(keys), "--days", "2").returncode == 0
    assert {"ca.pem", "client.key", "client.pem", "server.key", "server.pem"} <= {
        p.name for p in keys.iterdir()
    }
    assert (keys / "server.key").stat().st_mode & 0o777 == 0o600
    assert (keys / "client.key").stat().st_mode & 0o777 == 0o600
    ca = (keys / "ca.pem").read_bytes()
    again = run_here("keys", "init", str(keys))
    assert again.returncode != 0 and "exist" in again.stderr and "Traceback" not in again.stderr
    assert (keys / "ca.pem").read_bytes() == ca
    assert run_here("keys", "init", str(keys), "--force").returncode == 0
    assert (keys / "ca.pem").read_bytes() != ca


def test_generate_json_matches_the_contract(served: tuple[subprocess.Popen[str], str], keys: Path) -> None:
    _, url = served
    out = run(
        "generate",
        "--server",
        url,
        "--security",
        "tls+aesgcm",
        "--keys",
        str(keys),
        "--model",
        "tiny-random-llama",
        "--max-new-tokens",
        "12",
        "--json",
        "hello",
    )
    assert out.returncode == 0, out.stderr
    data = json.loads(out.stdout)
    assert set(data) == {"text", "token_ids", "security", "split", "wire", "stats"}
    assert set(data["stats"]) == {
        "new_tokens",
        "tokens_per_s",
        "time_to_first_token_s",
        "bytes_sent",
        "bytes_received",
        "transport",
        "failovers",
        "failover_s",
        "defence",
        "head_depth",
    }
    assert data["stats"]["transport"] == "stream"  # the default path, in the mode that was asked for
    assert data["stats"]["failovers"] == 0 and data["stats"]["defence"] is None  # off unless asked for
    assert data["stats"]["head_depth"] == 2  # the split's own: no range was asked for
    assert data["security"] == "tls+aesgcm" and data["split"] == [2, 6] and data["wire"] == "fp32"
    assert data["stats"]["bytes_sent"] > 12 * 64 * 4 and data["stats"]["bytes_received"] > 12 * 64 * 4
    client, _ = local_client(__import__("lambda_split").resolve("tiny-random-llama"), "2:-2")
    assert data["token_ids"] == client.generate("hello", GenerationConfig(max_new_tokens=12)).token_ids[0]


def test_generate_over_http_and_over_the_stream_agree(
    served: tuple[subprocess.Popen[str], str], keys: Path
) -> None:
    _, url = served
    base = ["generate", "--server", url, "--security", "tls+aesgcm", "--keys", str(keys)]
    base += ["--model", "tiny-random-llama", "--max-new-tokens", "6", "--json"]
    outs = {kind: run_here(*base, "--transport", kind, "hi") for kind in ("stream", "http")}
    assert all(out.returncode == 0 for out in outs.values()), [o.stderr for o in outs.values()]
    data = {kind: json.loads(out.stdout) for kind, out in outs.items()}
    assert data["stream"]["token_ids"] == data["http"]["token_ids"]
    assert set(data["stream"]["stats"]) == set(data["http"]["stats"])
    assert [data[kind]["stats"]["transport"] for kind in ("stream", "http")] == ["stream", "http"]
    assert data["stream"]["security"] == data["http"]["security"] == "tls+aesgcm"
    # socket bytes: the stream's include its WebSocket upgrade and the handshake of its own channel
    assert data["stream"]["stats"]["bytes_sent"] > 0 and data["stream"]["stats"]["bytes_received"] > 0
    bad = run_here(*base, "--transport", "carrier-pigeon", "hi")
    assert bad.returncode == 2


def test_generate_reads_the_prompt_from_stdin(served: tuple[subprocess.Popen[str], str], keys: Path) -> None:
    _, url = served
    args = [
        "generate",
        "--server",
        url,
        "--security",
        "tls+aesgcm",
        "--keys",
        str(keys),
        "--model",
        "tiny-random-llama",
        "--max-new-tokens",
        "5",
        "--json",
    ]
    from_stdin = run(*args, stdin="hello")  # no PROMPT: a real process's stdin
    assert from_stdin.returncode == 0, from_stdin.stderr
    dash = run_here(*args, "-", stdin="hello")  # PROMPT "-": stdin too
    assert dash.returncode == 0, dash.stderr
    assert json.loads(from_stdin.stdout)["token_ids"] == json.loads(dash.stdout)["token_ids"]
    given = run_here(*args, "hello")
    assert json.loads(dash.stdout)["token_ids"] == json.loads(given.stdout)["token_ids"]


@pytest.mark.parametrize(
    ("args", "code"),
    [
        (["generate", "--security", "tls"], 2),  # usage: missing --server and --model
        (["serve", "--model", "tiny-random-llama"], 2),
        (
            [
                "imagine",
                "--server",
                "http://127.0.0.1:9",
                "--security",
                "plain",
                "--model",
                "tiny-random-sd",
                "--out",
                "picture.jpg",
                "a fox",
            ],
            2,
        ),  # usage: no --security, there is no default
        (["serve", "--security", "tls", "--model", "tiny-random-llama"], 2),  # tls without --keys
        (["serve", "--security", "plain", "--host", "0.0.0.0", "--model", "tiny-random-llama"], 2),
        (
            [
                "generate",
                "--server",
                "http://127.0.0.1:9",
                "--security",
                "plain",
                "--model",
                "tiny-random-llama",
                "hi",
            ],
            4,
        ),  # nothing listens there
    ],
)
def test_errors_exit_with_the_contract_codes(args: list[str], code: int) -> None:
    out = run_here(*args)
    assert out.returncode == code, out.stderr
    assert ("Traceback" not in out.stderr and out.stderr.strip().count("\n") <= 1) or code == 2


def test_a_refused_serve_exits_2_in_a_process() -> None:
    """The status a shell sees for a usage error (3 is test_wrong_credentials_exit_3, 0 the JSON and
    SIGTERM tests), one line on stderr, no traceback; and a refused ``serve`` never starts listening."""
    out = run("serve", "--security", "plain", "--host", "0.0.0.0", "--model", "tiny-random-llama")
    assert out.returncode == 2, out.stderr
    assert "Traceback" not in out.stderr and out.stderr.strip().count("\n") <= 1, out.stderr
    assert "listening on" not in out.stdout


def test_wrong_credentials_exit_3(served: tuple[subprocess.Popen[str], str], tmp_path: Path) -> None:
    _, url = served
    assert run_here("keys", "init", str(tmp_path)).returncode == 0  # a different CA
    out = run(
        "generate",
        "--server",
        url,
        "--security",
        "tls+aesgcm",
        "--keys",
        str(tmp_path),
        "--model",
        "tiny-random-llama",
        "hi",
    )
    assert out.returncode == 3, out.stderr
    assert out.stderr.splitlines()[-1].startswith("lambda-split: error:") and "Traceback" not in out.stderr


# SIGTERM of a real serve exits 0 on every run in tests/server/test_serve_command.py
# (test_readme_toml_and_systemd_command_line_serve, the same tls+aesgcm mode started from a config file).
@pytest.mark.exhaustive
def test_sigterm_shuts_the_server_down_with_exit_0(keys: Path) -> None:
    process = start_serve(keys)  # its own: the module's server stays up for the other tests
    try:
        listening_url(process)
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=20) == 0
    finally:
        stop(process)


def test_the_library_never_imports_the_server() -> None:
    code = "import lambda_split, lambda_split.protocol, sys; print(any(m.split('.')[0] == 'server' for m in sys.modules))"
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=os.environ, check=True
    )
    assert out.stdout.strip() == "False"
