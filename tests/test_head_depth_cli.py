"""``serve --head-depths`` and ``generate --head-depth``: bad values exit 2 before any model loads; a
live server (stream and HTTP) runs each session at its depth and ``generate --json`` says which."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from lambda_split import Checkpoint, ServerError, load_llm_service
from lambda_split._stream import make_link
from lambda_split.cli import main
from secure_channel import connect_transport
from server import BackgroundServer, ServerConfig, load_config

SERVE = ["serve", "--security", "plain", "--model", "tiny-random-llama", "--port", "0"]
GEN = ["generate", "--server", "http://127.0.0.1:9", "--security", "plain", "--model", "tiny-random-llama"]


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        ([*SERVE, "--head-depths", "1-4"], "must look like LO:HI"),
        ([*SERVE, "--head-depths", "0:3"], "need 1 <= LO <= HI"),
        ([*SERVE, "--head-depths", "3:1"], "need 1 <= LO <= HI"),
        ([*GEN, "--head-depth", "0", "hi"], "head depth must be at least 1"),
        ([*GEN, "--head-depth", "deep", "hi"], "must be 'random' or a layer number"),
    ],
)
def test_bad_values_are_usage_errors(
    capsys: pytest.CaptureFixture[str], argv: list[str], message: str
) -> None:
    with pytest.raises(SystemExit) as exit_info:  # argparse: before any command runs
        main(argv)
    assert exit_info.value.code == 2 and message in capsys.readouterr().err


@pytest.mark.parametrize(
    ("split", "depths", "message"),
    [
        ("2:6", "3:4", "must include the split's depth 2"),
        ("2:6", "1:6", "must stay below the trunk's end 6"),
    ],
)
def test_a_range_that_does_not_fit_the_split_exits_2_before_the_model_loads(
    capsys: pytest.CaptureFixture[str], split: str, depths: str, message: str
) -> None:
    assert main([*SERVE, "--split", split, "--head-depths", depths]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert "loading" not in err  # serve says "loading trunk layers" before it reads any weight


def test_a_negative_b_is_checked_once_the_layer_count_is_read_before_any_weight() -> None:
    from server.config import ConfigError
    from server.run import load_service

    said: list[str] = []
    config = load_config(
        None, {}, model="tiny-random-llama", split="2:-2", head_depths="1:6", security="plain"
    )
    with pytest.raises(ConfigError, match="must stay below the trunk's end 6"):  # B = 6 of tiny's 8 layers
        load_service(config.validate(), said.append)
    assert said == []  # "loading trunk layers ..." comes before the weights


def test_the_config_file_takes_head_depths_with_the_same_checks(tmp_path: Path) -> None:
    from server.config import ConfigError

    file = tmp_path / "server.toml"
    file.write_text('[server]\nsecurity = "plain"\nsplit = "2:6"\nhead_depths = "1:4"\n')
    assert load_config(file, {}).validate().head_depths == "1:4"
    file.write_text('[server]\nsecurity = "plain"\nsplit = "2:6"\nhead_depths = "3:4"\n')
    with pytest.raises(ConfigError, match="head_depths"):
        load_config(file, {}).validate()


def test_a_chain_refuses_a_head_depth(capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["generate", "--hop", "http://127.0.0.1:9", "--hop", "http://127.0.0.1:10", "--security", "plain"]
    assert main([*argv, "--model", "tiny-random-llama", "--head-depth", "random", "hi"]) == 2
    assert "--head-depth is not supported with --hop/--plan" in capsys.readouterr().err


@pytest.fixture(scope="module")
def live(tiny: Checkpoint) -> Iterator[str]:
    service = load_llm_service(tiny, "2:6", security="plain", head_depths="1:4")
    config = ServerConfig(model=tiny.name, split="2:6", head_depths="1:4", security="plain", port=0)
    with BackgroundServer(config, service) as running:
        yield running.url


@pytest.mark.parametrize(("transport", "depth"), [("stream", "random"), ("http", "3")])
def test_generate_json_reports_the_sessions_depth(
    live: str, capsys: pytest.CaptureFixture[str], transport: str, depth: str
) -> None:
    argv = ["generate", "--server", live, "--security", "plain", "--model", "tiny-random-llama", "--raw"]
    argv += ["--transport", transport, "--head-depth", depth, "--max-new-tokens", "3", "--json", "hi"]
    assert main(argv) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["split"] == [2, 6] and data["stats"]["head_depth"] in (
        {1, 2, 3, 4} if depth == "random" else {3}
    )


@pytest.mark.parametrize("kind", ["stream", "http"])
def test_the_server_refuses_a_depth_outside_its_range_on_both_paths(live: str, kind: Any) -> None:
    transport = connect_transport(live, "plain")
    try:
        link = make_link(transport, kind)
        with pytest.raises(ServerError) as refused:
            link.open("fp32", {"head_depth": 5})
        assert (refused.value.status, refused.value.code) == (400, "bad_head_depth")
        assert link.open("fp32", {"head_depth": 4})["head_depth"] == 4
    finally:
        if hasattr(link, "shutdown"):
            link.shutdown()
        transport.close()
