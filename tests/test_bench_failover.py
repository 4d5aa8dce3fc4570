"""The failover section of the benchmark on tiny-random-llama: structure and token identity, never a timing.

Replicas are ``lambda-split serve`` child processes; one is killed with SIGKILL mid-generation and
the library's failover client carries on, on the other replica (2) or on the same one restarted (1).
"""

from __future__ import annotations

import argparse
import json
import math
import os
from pathlib import Path
from typing import Any

import pytest

from lambda_split.cli.bench import DeployPlan, add_arguments, deploy_plan
from lambda_split.cli.bench._failover import PHASES, Replicas, history_prompt
from lambda_split.cli.bench._procs import BenchError
from tests.helpers import run_bench_captured

TINY = "tiny-random-llama"
HISTORY = 16
PLAN = DeployPlan(model=TINY, sections=("failover",), failover_modes=("tls+aesgcm",), failover_history=(HISTORY,),
                  failover_replicas=(2, 1), failover_reps=1, failover_kill_after=4)  # fmt: skip


@pytest.fixture(scope="module")
def failover_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[str, Any], Path]:
    out = tmp_path_factory.mktemp("failover")
    messages: list[str] = []
    code, printed = run_bench_captured(PLAN, out, messages)
    assert code == 0, messages
    assert len(printed) == 1, "--json prints exactly one JSON object"
    return json.loads(printed[0]), out


def _alive(pid: int) -> bool:
    status = Path(f"/proc/{pid}/status")
    try:
        return "zombie" not in status.read_text()
    except OSError:
        return False


@pytest.mark.heavy
def test_a_killed_replica_costs_one_replay_and_no_token(failover_run: tuple[dict[str, Any], Path]) -> None:
    results, _ = failover_run
    assert results["failed_sections"] == [] and "decode" not in results, "only the section asked for runs"
    section = results["failover"]
    assert section["wire"] == "fp32" and section["kill_after_token"] == 4
    by_replicas = section["by_mode"]["tls+aesgcm"]["by_replicas"]
    assert set(by_replicas) == {"2", "1"}
    for count, by_history in by_replicas.items():
        entry = by_history[str(HISTORY)]
        assert entry["runs"] == 1 and entry["tokens_equal_undisturbed"] == 1, "greedy tokens as undisturbed"
        assert entry["replayed_positions"] == [HISTORY], "the replay is the history the lost trunk held"
        hidden = 64  # tiny-random-llama's width: the fp32 replay carries every position's hidden state
        assert (
            entry["replay_bytes"]["sent"] > HISTORY * hidden * 4
            and entry["history_bytes"] >= HISTORY * hidden * 4
        )
        for phase in (*PHASES, "undisturbed_step_s"):
            value = entry[phase]["median"]
            assert math.isfinite(value) and value >= 0 and entry[phase]["n"] == 1, phase
        assert ("restart_s" in entry) == (count == "1"), "only the lone replica is restarted under the client"
        if count == "2":
            assert entry["attempts"]["median"] == 1, "the other replica takes over at the first attempt"


@pytest.mark.heavy
def test_every_replica_is_killed_or_stopped_and_none_is_left(
    failover_run: tuple[dict[str, Any], Path],
) -> None:
    results, _ = failover_run
    procs = results["failover"]["processes"]["tls+aesgcm"]
    assert os.getpid() not in procs["pids"] and len(set(procs["pids"])) == len(procs["pids"])
    assert procs["exit_codes"].count(-9) == 2, "one SIGKILL per failover run"
    assert procs["exit_codes"][-2:] == [0, 0], "the replicas left at the end stop cleanly on SIGTERM"
    assert not any(_alive(pid) for pid in procs["pids"])


@pytest.mark.heavy
def test_the_report_has_the_failover_table(failover_run: tuple[dict[str, Any], Path]) -> None:
    _, out = failover_run
    text = (out / "results.md").read_text()
    assert "## Failover" in text and "| replicas | history |" in text and "### tls+aesgcm" in text
    assert json.loads((out / "results.json").read_text())["failover"]["history"] == [HISTORY]


def test_failover_options_choose_the_plan() -> None:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    args = parser.parse_args(["--sections", "failover", "--failover-history", "512,32", "--failover-replicas", "1",
                              "--failover-modes", "plain", "--failover-deadline", "30", "--failover-transport", "http"])  # fmt: skip
    plan = deploy_plan(TINY, quick=False, options=vars(args))
    assert (
        plan.sections == ("failover",)
        and plan.failover_history == (32, 512)
        and plan.failover_replicas == (1,)
    )
    assert (
        plan.failover_modes == ("plain",)
        and plan.failover_deadline == 30.0
        and plan.failover_transport == "http"
    )
    assert "failover" not in deploy_plan(TINY, quick=False).sections, "failover runs only when asked for"
    quick = deploy_plan(TINY, quick=True)
    assert quick.failover_reps < DeployPlan().failover_reps and quick.failover_kill_after <= 4


@pytest.mark.parametrize(
    "argv",
    [["--sections", "failover,bogus"], ["--failover-history", "8"], ["--failover-history", "x"],
     ["--failover-replicas", "3"], ["--failover-reps", "0"], ["--failover-deadline", "0"],
     ["--failover-deadline", "nan"], ["--failover-transport", "udp"]],
)  # fmt: skip
def test_bad_failover_options_are_usage_errors(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    with pytest.raises(SystemExit) as exit_info:
        parser.parse_args(argv)
    assert exit_info.value.code == 2
    assert "Traceback" not in capsys.readouterr().err


def test_the_prompt_makes_the_history_the_length_asked_for() -> None:
    ids = history_prompt(32, 8)
    assert ids.shape == (1, 25), "the trunk holds the prompt and 7 of the 8 tokens when the kill comes"
    assert bool((history_prompt(32, 8) == ids).all()), "seeded"
    with pytest.raises(ValueError):
        history_prompt(4, 8)


class _FakeReplica:
    def __init__(self, name: str, fails: bool) -> None:
        self.name, self.fails, self.pid, self.stopped = name, fails, 0, False

    def ready(self) -> str:
        if self.fails:
            raise BenchError(f"{self.name} did not start")
        return f"http://127.0.0.1:{1000 + int(self.name[1:])}"

    def stop(self) -> int:
        self.stopped = True
        return 0


def test_replicas_that_fail_to_start_leave_none_running() -> None:
    started: list[_FakeReplica] = []

    def start(name: str, _port: int) -> Any:
        started.append(_FakeReplica(name, fails=name == "r1"))
        return started[-1]

    with pytest.raises(BenchError, match="r1 did not start"):
        Replicas(start, 2, lambda _m: None)
    assert [r.stopped for r in started] == [True, True]
