"""``lambda-split serve`` as deployed: README's own config file and systemd command line start a
real server; configuration errors and a port in use are refused before the model loads."""

from __future__ import annotations

import contextlib
import io
import os
import re
import shlex
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from lambda_split.cli import main
from secure_channel import Request, connect_transport
from server.observability import LOGGER
from tests.secure_channel.conftest import PKI

README = Path(__file__).resolve().parents[2] / "README.md"
CLI = [sys.executable, "-m", "lambda_split"]
FENCE = re.compile(r"^[ \t]*```(\w+)[ \t]*\n(.*?)^[ \t]*```[ \t]*$", re.M | re.S)
# Stand-ins for what only exists on a deployed host; everything else is README's text verbatim.
HOST_OVERRIDES = {
    "LAMBDA_SPLIT_MODEL": "tiny-random-llama",
    "LAMBDA_SPLIT_HOST": "127.0.0.1",
    "LAMBDA_SPLIT_PORT": "0",
}


def readme_block(language: str, marker: str) -> str:
    """The fenced ``language`` block of README.md that contains ``marker``, dedented."""
    for found, body in FENCE.findall(README.read_text()):
        if found == language and marker in body:
            indent = min(len(line) - len(line.lstrip()) for line in body.splitlines() if line.strip())
            return "\n".join(line[indent:] for line in body.splitlines()) + "\n"
    raise AssertionError(f"README.md has no ```{language} block containing {marker!r}")


def exec_start() -> list[str]:
    unit = readme_block("ini", "ExecStart=")
    line = next(line for line in unit.splitlines() if line.startswith("ExecStart="))
    return shlex.split(line.removeprefix("ExecStart="))


def run(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """``lambda-split ARGS`` through :func:`main` in this process, with only ``env``'s LAMBDA_SPLIT_*
    variables: a refusal before the model loads needs no interpreter of its own (the status a shell
    sees for a refused serve: tests/test_cli.py::test_a_refused_serve_exits_2_in_a_process)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err), pytest.MonkeyPatch.context() as mp:
        # serve points the server's logger at this stderr: put it back afterwards
        mp.setattr(LOGGER, "handlers", list(LOGGER.handlers))
        mp.setattr(LOGGER, "propagate", LOGGER.propagate)
        mp.setattr(LOGGER, "level", LOGGER.level)
        for name in [k for k in os.environ if k.startswith("LAMBDA_SPLIT_")]:
            mp.delenv(name)
        for name, value in (env or {}).items():
            mp.setenv(name, value)
        try:
            code = main(list(args))
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else 1
    return subprocess.CompletedProcess(list(args), code, out.getvalue(), err.getvalue())


def test_readme_toml_and_systemd_command_line_serve(server_pki: PKI, tmp_path: Path) -> None:
    toml = readme_block("toml", "[server]")
    config_path = toml.splitlines()[0].removeprefix("# ").strip()
    command = exec_start()
    assert Path(command[0]).name == "lambda-split" and command[1:] == ["serve", "--config", config_path]
    assert re.search(r'^security = "tls\+aesgcm"$', toml, re.M)  # the mode comes from the file alone
    config = tmp_path / "server.toml"
    config.write_text(toml)
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("LAMBDA_SPLIT_")},
        **HOST_OVERRIDES,
        "LAMBDA_SPLIT_KEYS": str(server_pki.root),
    }
    argv = [*CLI, *command[1:-1], str(config)]
    process = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        assert process.stdout is not None
        line = process.stdout.readline()
        assert line.startswith("listening on https://127.0.0.1:"), (
            process.stderr.read() if process.stderr else ""
        )
        url = line.split()[-1]
        with connect_transport(url, "tls+aesgcm", keys_dir=server_pki.root) as transport:
            reply = transport.exchange(Request("GET", "/healthz"))
            assert reply.status == 200 and reply.content == b'{"status":"ok"}'
            info = transport.exchange(Request("GET", "/v1/info"))
            assert b'"security":"tls+aesgcm"' in info.content
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=60) == 0
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        for stream in (process.stdout, process.stderr):
            if stream is not None:
                stream.close()


def test_no_security_mode_anywhere_exits_2_naming_all_three_places() -> None:
    out = run("serve", "--model", "tiny-random-llama")
    assert out.returncode == 2
    assert out.stderr.strip() == (
        "lambda-split: error: no security mode: pass --security, set security in the [server] "
        "section of FILE, or LAMBDA_SPLIT_SECURITY"
    )


def test_a_misspelled_section_exits_2_naming_it(tmp_path: Path) -> None:
    config = tmp_path / "server.toml"
    config.write_text('[sever]\nsecurity = "plain"\n')
    out = run("serve", "--config", str(config))
    assert out.returncode == 2
    assert "[sever]" in out.stderr and "[server], [limits]" in out.stderr


def test_a_port_in_use_exits_1_before_the_model_loads() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        out = run("serve", "--security", "plain", "--model", "tiny-random-llama", "--port", str(port))
    assert out.returncode == 1
    assert out.stderr.strip() == (
        f"lambda-split: error: cannot listen on 127.0.0.1:{port}: the port is already in use; "
        "choose another with --port (or port in the config file, or LAMBDA_SPLIT_PORT)"
    )


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"LAMBDA_SPLIT_SPLIT": "0:5"}, "split 0:5 needs 1 <= A <= B"),
        ({"LAMBDA_SPLIT_SPLIT": "2:99"}, "split 2:99 needs 1 <= A <= B <= 8"),
        ({"LAMBDA_SPLIT_PORT": "70000"}, "port must be in 0..65535"),
        ({"LAMBDA_SPLIT_MAX_STEP_TOKENS": "0"}, "max_step_tokens must be at least 1"),
    ],
)
def test_bad_settings_exit_2_before_the_model_loads(env: dict[str, str], message: str) -> None:
    out = run("serve", "--security", "plain", "--model", "tiny-random-llama", env=env)
    assert out.returncode == 2 and message in out.stderr, out.stderr
    assert "loading" not in out.stderr
