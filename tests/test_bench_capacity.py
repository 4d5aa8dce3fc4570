"""The capacity section of the benchmark on tiny-random-llama: structure and answers, never a timing."""

from __future__ import annotations

import argparse
import json
from typing import Any

import pytest
import torch

from lambda_split.cli.bench import DeployPlan, _capacity, add_arguments, deploy_plan
from tests.helpers import run_bench_captured

TINY = "tiny-random-llama"
PLAN = DeployPlan(model=TINY, split="1:-1", sections=("capacity",), concurrency_modes=("plain",),
                  transports=("stream",), wire="fp32", clients=(1, 2), concurrency_tokens=4,
                  concurrency_reps=1)  # fmt: skip


def _run(tmp_path: Any) -> tuple[int, dict[str, Any], list[str]]:
    messages: list[str] = []
    code, printed = run_bench_captured(PLAN, tmp_path, messages)
    return code, json.loads(printed[0]), messages


@pytest.mark.heavy
def test_replaying_devices_get_the_recorded_answers_batched(tmp_path: Any) -> None:
    code, results, messages = _run(tmp_path)
    assert code == 0, messages
    assert results["failed_sections"] == [] and "concurrency" not in results, "only the section asked for"
    table = results["capacity"]["by_variant"]["plain/stream"]
    for n in ("1", "2"):
        assert table["by_clients"][n]["outputs_match"], n
        assert table["by_clients"][n]["max_rel_diff"] <= _capacity.MATCH
        assert table["by_clients"][n]["aggregate_tokens_per_s"]["median"] > 0
    # A warm-up replay on both devices, then 1 device, then 2: one prefill per replay.
    batching = table["server_batching"]
    assert batching["prefills"] == 2 + 1 + 2 and batching["decode_batches"] > 0
    assert "## Trunk server capacity" in (tmp_path / "results.md").read_text()


@pytest.mark.exhaustive  # the comparison itself: test_replay_compares_every_answer_with_the_recording
def test_an_answer_that_differs_from_the_recording_is_reported(tmp_path: Any) -> None:
    real = _capacity.save_file

    def skewed(tensors: dict[str, torch.Tensor], path: str) -> None:  # recorded answers off by 1 %
        real({k: v * 1.01 if k.endswith(".out") else v for k, v in tensors.items()}, path)

    patch = pytest.MonkeyPatch()
    patch.setattr(_capacity, "save_file", skewed)  # the recording is made here, replayed by the devices
    try:
        code, results, messages = _run(tmp_path)
    finally:
        patch.undo()
    assert code == 0, messages
    entry = results["capacity"]["by_variant"]["plain/stream"]["by_clients"]["1"]
    assert not entry["outputs_match"] and entry["max_rel_diff"] > _capacity.MATCH


def test_capacity_runs_only_when_asked_for() -> None:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    plan = deploy_plan(TINY, quick=False, options=vars(parser.parse_args(["--sections", "capacity"])))
    assert plan.sections == ("capacity",)
    assert "capacity" not in deploy_plan(TINY, quick=False).sections


def test_replay_compares_every_answer_with_the_recording() -> None:
    steps = [(torch.ones(1, 2, 3), torch.ones(1, 2, dtype=torch.long), torch.full((1, 2, 3), 2.0)),
             (torch.ones(1, 1, 3), torch.ones(1, 1, dtype=torch.long), torch.full((1, 1, 3), 4.0))]  # fmt: skip

    class Link:  # a server whose trunk doubles its input, answering through the real frame codec
        def open(self, wire: str, options: Any = None) -> dict[str, str]:
            return {"session_id": "00" * 16}

        def step(self, session_id: str, frame: bytes) -> bytes:
            from lambda_split._codec import Encoding, FrameKind, decode_frame, encode_frame

            request = decode_frame(frame)
            hidden = request.tensor("hidden", rank=3) * 2
            return encode_frame(
                FrameKind.LLM_RESULT, request.session_id, request.seq, {"hidden": (hidden, Encoding.FP32)}
            )

        def close(self, session_id: str) -> None:
            pass

    out = _capacity.replay(Link(), "fp32", steps)  # type: ignore[arg-type]
    assert out["new_tokens"] == 2 and len(out["latencies_s"]) == 1
    assert out["max_rel_diff"] == 0.5  # the second answer is 2, the recording says 4
    assert not _capacity.matches(out)
