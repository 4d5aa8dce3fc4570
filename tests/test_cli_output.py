"""What the command line prints: clean stderr, errors on their own line, Ctrl-C, the demo's figures."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import lambda_split.cli as cli
from lambda_split import Checkpoint, ServerError
from tests.server.conftest import LiveServer, start_server

GENERATE_KEYS = {"text", "token_ids", "security", "split", "wire", "stats"}
GENERATE_STATS = {"new_tokens", "tokens_per_s", "time_to_first_token_s", "bytes_sent", "bytes_received"}


@pytest.fixture(scope="module")
def plain_server(tiny: Checkpoint, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    server = start_server(tiny, "plain", tmp_path_factory.mktemp("unused"))
    yield server
    server.stop()


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "lambda_split", *args],
        capture_output=True,
        text=True,
        timeout=300,
        env={key: value for key, value in os.environ.items() if key != "PYTHONWARNINGS"},  # as a user runs it
    )


def test_generate_prints_no_warnings(plain_server: LiveServer) -> None:
    out = run_cli(
        "generate", "--server", plain_server.url, "--security", "plain", "--model", "tiny-random-llama",
        "--max-new-tokens", "4", "hello",
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert "Warning" not in out.stderr and "deprecated" not in out.stderr, out.stderr


def test_diffusion_commands_print_no_torchvision_notice(tmp_path: Path) -> None:
    server = start_server("tiny-random-sd", "plain", tmp_path)
    try:
        out = run_cli(
            "imagine", "--server", server.url, "--security", "plain", "--model", "tiny-random-sd",
            "--steps", "2", "--out", str(tmp_path / "fox.png"), "a fox",
        )  # fmt: skip
    finally:
        server.stop()
    assert out.returncode == 0, out.stderr
    assert "torchvision" not in out.stderr and "Warning" not in out.stderr, out.stderr


class FakeClient:
    """Streams some text, then fails as a killed server or a limit would."""

    def __init__(self, failure: BaseException) -> None:
        self.failure = failure

    def __enter__(self) -> FakeClient:
        return self

    def __exit__(self, *exc: object) -> None:
        pass

    def generate(self, prompt: str, config: Any, *, chat: bool, on_text: Any) -> Any:
        on_text(0, "Once upon a time")
        raise self.failure


@pytest.mark.parametrize(
    ("failure", "code", "last_line"),
    [
        (
            ServerError(422, "session_token_limit", "a session holds at most 64 tokens"),
            4,
            "lambda-split: error:",
        ),
        (KeyboardInterrupt(), 130, "lambda-split: interrupted"),
    ],
)
def test_an_error_after_streamed_text_starts_on_a_new_line(
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    failure: BaseException,
    code: int,
    last_line: str,
) -> None:
    from lambda_split._client import SplitClient

    monkeypatch.setattr(SplitClient, "connect", classmethod(lambda cls, *a, **k: FakeClient(failure)))
    argv = [
        "generate",
        "--server",
        "http://127.0.0.1:9",
        "--security",
        "plain",
        "--model",
        "tiny-random-llama",
    ]
    assert cli.main([*argv, "hi"]) == code
    out, err = capsys.readouterr()
    assert out == "Once upon a time\n"
    lines = [line for line in err.splitlines() if not line.startswith("[")]  # progress lines are timestamped
    assert len(lines) == 1 and lines[0].startswith(last_line)


class TTY(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_generate_on_a_terminal_says_it_is_reading_stdin(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(sys, "stdin", TTY("hello from stdin"))
    assert cli.read_prompt(None) == "hello from stdin"
    assert "reading the prompt from stdin; end it with Ctrl-D" in capsys.readouterr().err
    monkeypatch.setattr(sys, "stdin", io.StringIO("piped"))
    assert cli.read_prompt("-") == "piped"
    assert capsys.readouterr().err == ""


def test_demo_json_has_generates_shape_and_separate_decode_and_prompt_figures(
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert (
        cli.main(
            ["demo", "--model", "tiny-random-llama", "--security", "plain", "--max-new-tokens", "8", "--json"]
        )
        == 0
    )
    out, err = capsys.readouterr()
    data = json.loads(out)
    assert set(data) >= GENERATE_KEYS and set(data["stats"]) >= GENERATE_STATS
    assert data["split"] == [2, 6] and data["wire"] == "fp32" and data["security"] == "plain"
    stats = data["stats"]
    assert stats["new_tokens"] == len(data["token_ids"]) == 8
    # The prompt's step carries every prompt position; a decode step carries one.
    assert stats["prompt_bytes"] > 4 * stats["bytes_per_decode_token"] > 0
    assert "about 20 s" not in err


def test_demo_text_shows_decode_speed_first_token_and_wire(capsys: pytest.CaptureFixture[str]) -> None:
    assert (
        cli.main(
            [
                "demo",
                "--model",
                "tiny-random-llama",
                "--security",
                "plain",
                "--max-new-tokens",
                "4",
                "--wire",
                "fp16",
            ]
        )
        == 0
    )
    summary = capsys.readouterr().out.strip().splitlines()[-1]
    for part in (
        "decode",
        "tokens/s",
        "first token after",
        "prompt upload",
        "wire bytes per token",
        "wire fp16",
    ):
        assert part in summary, summary
