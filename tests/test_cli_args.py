"""Argument errors are found by the parser, before any command runs (so before any model loads)."""

from __future__ import annotations

from importlib import metadata
from pathlib import Path

import pytest

import lambda_split.cli as cli
import lambda_split.cli._keys as keys_cli

GEN = ["generate", "--server", "http://127.0.0.1:9", "--security", "plain", "--model", "tiny-random-llama"]
IMAGINE = ["imagine", "--server", "http://127.0.0.1:9", "--security", "plain", "--model", "tiny-random-sd"]
COMMANDS = (
    "cmd_serve",
    "cmd_generate",
    "cmd_imagine",
    "cmd_demo",
    "cmd_bench",
    "cmd_eavesdrop",
)


@pytest.fixture
def nothing_runs(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Replace every command with a recorder: a usage error must stop before any of them runs."""
    ran: list[str] = []
    for name in COMMANDS:
        monkeypatch.setattr(cli, name, lambda _args, name=name: ran.append(name) or 0)
    for name in [n for n in dir(keys_cli) if n.startswith("cmd_")]:
        monkeypatch.setattr(keys_cli, name, lambda _args, name=name: ran.append(name) or 0)
    return ran


def usage_error(capsys: pytest.CaptureFixture[str], argv: list[str]) -> str:
    with pytest.raises(SystemExit) as exit_info:
        cli.main(argv)
    assert exit_info.value.code == 2
    return capsys.readouterr().err


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["keys", "init", "DIR", "--days", "0"], "--days: days must be between 1 and 825, got 0"),
        (["keys", "init", "DIR", "--days", "x"], "--days: not a whole number of days"),
        (["keys", "add-client", "DIR", "dev", "--out", "D", "--days", "0"], "--days: days must be between 1"),
        (["serve", "--security", "plain", "--split", "0:5"], "A must be at least 1"),
        (["serve", "--security", "plain", "--split", "5:3"], "needs A <= B"),
        (["serve", "--security", "plain", "--split", "2-4"], "must look like A:B"),
        (["serve", "--security", "plain", "--port", "70000"], "--port: must be a port"),
        (["demo", "--split", "0:-2"], "A must be at least 1"),
        (["eavesdrop", "--split", "0:-2"], "A must be at least 1"),
        ([*GEN, "--split", "0:5", "hi"], "A must be at least 1"),
        ([*GEN, "--pad-prompt", "-3", "hi"], "--pad-prompt: must be 0 (off) or more, got -3"),
        ([*GEN, "--max-new-tokens", "0", "hi"], "--max-new-tokens: must be at least 1"),
        ([*GEN, "--top-p", "0", "hi"], "--top-p: must be in (0, 1]"),
        ([*GEN, "--temperature", "-1", "hi"], "--temperature: must be 0 or more"),
        ([*IMAGINE, "--steps", "0", "--out", "x.png", "a fox"], "--steps: must be at least 1"),
        ([*IMAGINE, "--out", "x.jpg", "a fox"], "must name a .png file"),
        (
            [*IMAGINE, "--out", "/nonexistent/dir/x.png", "a fox"],
            "directory '/nonexistent/dir' does not exist",
        ),
    ],
)
def test_bad_values_exit_2_naming_the_option(
    nothing_runs: list[str], capsys: pytest.CaptureFixture[str], argv: list[str], expected: str
) -> None:
    err = usage_error(capsys, argv)
    assert expected in err and "Traceback" not in err
    assert nothing_runs == []


@pytest.mark.parametrize(
    ("url", "security", "expected"),
    [
        ("ftp://127.0.0.1:8443", "plain", "expected http://HOST:PORT for --security plain"),
        ("127.0.0.1:8443", "tls", "expected https://HOST:PORT for --security tls"),
        ("http://127.0.0.1:8443", "tls+aesgcm", "must be https://HOST:PORT"),
        ("https://127.0.0.1:8443", "plain", "must be http://HOST:PORT"),
        ("http://127.0.0.1:8443/v1", "plain", "without a path"),
        ("http://127.0.0.1:99999", "plain", "invalid port"),
    ],
)
def test_a_url_that_cannot_fit_the_mode_exits_2_with_the_expected_form(
    nothing_runs: list[str], capsys: pytest.CaptureFixture[str], url: str, security: str, expected: str
) -> None:
    argv = ["generate", "--server", url, "--security", security, "--model", "tiny-random-llama", "hi"]
    assert expected in usage_error(capsys, argv)
    assert nothing_runs == []


def test_aesgcm_takes_http_or_https_to_a_tls_terminating_proxy() -> None:
    from lambda_split.cli._args import url_problem

    assert url_problem("http://127.0.0.1:8443", "aesgcm") is None
    assert url_problem("https://trunk.example.com", "aesgcm") is None
    assert url_problem("https://127.0.0.1:8443", "plain") is not None


def test_a_missing_model_file_is_named_before_anything_loads(
    nothing_runs: list[str], capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    missing = str(tmp_path / "model.gguf")
    argv = ["generate", "--server", "http://127.0.0.1:9", "--security", "plain", "--model", missing, "hi"]
    assert f"file not found: {missing}" in usage_error(capsys, argv)
    assert "unknown model 'smollm3'" in usage_error(capsys, [*GEN[:-1], "smollm3", "hi"])
    assert nothing_runs == []


def test_the_library_names_a_missing_gguf_file_too(tmp_path: Path) -> None:
    from lambda_split import resolve
    from lambda_split._errors import ModelNotFoundError

    with pytest.raises(ModelNotFoundError, match="file not found"):
        resolve(str(tmp_path / "model.gguf"))


@pytest.mark.parametrize(
    ("argv", "usage"),
    [
        ([*GEN, "--bogus", "hi"], "usage: lambda-split generate"),
        (["keys", "init", "DIR", "--bogus"], "usage: lambda-split keys init"),
        (["demo", "--bogus"], "usage: lambda-split demo"),
        (["serve", "--security", "plain", "--bogus"], "usage: lambda-split serve"),
    ],
)
def test_unknown_options_print_the_subcommands_usage(
    nothing_runs: list[str], capsys: pytest.CaptureFixture[str], argv: list[str], usage: str
) -> None:
    err = usage_error(capsys, argv)
    assert err.startswith(usage) and "unrecognized arguments: --bogus" in err
    assert nothing_runs == []


@pytest.mark.parametrize("where", ["before", "after"])
def test_debug_is_accepted_before_or_after_the_subcommand(
    monkeypatch: pytest.MonkeyPatch, where: str
) -> None:
    seen: list[bool] = []
    monkeypatch.setattr(cli, "cmd_demo", lambda args: seen.append(args.debug) or 0)
    assert cli.main(["--debug", "demo"] if where == "before" else ["demo", "--debug"]) == 0
    assert cli.main(["demo"]) == 0
    assert seen == [True, False]


def test_a_split_with_a_negative_end_is_not_mistaken_for_an_option(monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[tuple[str, str]] = []
    monkeypatch.setattr(cli, "cmd_generate", lambda args: seen.append((args.split, args.prompt)) or 0)
    assert cli.main([*GEN, "--split", "1:-1", "hi"]) == 0
    assert seen == [("1:-1", "hi")]


def test_version_comes_from_the_package_metadata(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["--version"])
    assert exit_info.value.code == 0
    assert capsys.readouterr().out.strip() == f"lambda-split {metadata.version('lambda-split')}"


@pytest.mark.parametrize(
    "argv",
    [
        [*GEN, "hi"],
        [*IMAGINE, "--out", "x.png", "hi"],
        ["demo", "--model", "tiny-random-llama"],
        ["eavesdrop"],
    ],
)
def test_the_stream_is_the_default_path_and_http_stays_available(argv: list[str]) -> None:
    parser = cli.build_parser()
    assert parser.parse_args(argv).transport == "stream"
    assert parser.parse_args([*argv[:1], "--transport", "http", *argv[1:]]).transport == "http"
