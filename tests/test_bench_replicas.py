"""The replicas section of the benchmark on tiny-random-llama: structure, spread and token identity, never a timing."""

from __future__ import annotations

import argparse
import json
from typing import Any

import pytest

from lambda_split.cli.bench import DeployPlan, add_arguments, deploy_plan
from tests.helpers import run_bench_captured

TINY = "tiny-random-llama"
CLIENTS, TOKENS = 2, 4
PLAN = DeployPlan(model=TINY, split="1:-1", sections=("replicas",), concurrency_modes=("plain",),
                  concurrency_tokens=TOKENS, replica_clients=CLIENTS, replica_reps=1)  # fmt: skip


@pytest.mark.heavy
def test_clients_run_on_one_replica_then_spread_over_two_with_their_solo_tokens(
    tmp_path: Any,
) -> None:
    messages: list[str] = []
    code, printed = run_bench_captured(PLAN, tmp_path, messages)
    assert code == 0, messages
    results = json.loads(printed[0])
    assert results["failed_sections"] == [] and "concurrency" not in results, (
        "only the section asked for runs"
    )
    entry = results["replicas"]["by_mode"]["plain"]
    assert entry["replica_exit_codes"] == [0, 0], "both replicas stopped cleanly"
    one, two = entry["by_replicas"]["1"], entry["by_replicas"]["2"]
    # Prefill steps counted by each replica's /metrics (a retried step would count twice, hence >=).
    assert one["prefills_per_replica"][0] >= CLIENTS and one["prefills_per_replica"][1] == 0, "all on A"
    assert min(two["prefills_per_replica"]) >= CLIENTS // 2, "two replicas: sessions spread over both"
    assert one["tokens_unchanged"] and two["tokens_unchanged"]
    assert entry["two_over_one"]["n"] == 1 and one["aggregate_tokens_per_s"]["median"] > 0
    assert "## Replicas" in (tmp_path / "results.md").read_text()


def test_replica_options_choose_the_plan() -> None:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    args = parser.parse_args(["--sections", "replicas", "--replica-clients", "6", "--replica-reps", "2"])
    plan = deploy_plan(TINY, quick=False, options=vars(args))
    assert (plan.sections, plan.replica_clients, plan.replica_reps) == (("replicas",), 6, 2)
    assert "replicas" not in deploy_plan(TINY, quick=False).sections, "replicas runs only when asked for"
    with pytest.raises(SystemExit):
        parser.parse_args(["--replica-clients", "0"])
