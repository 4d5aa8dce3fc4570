"""The attack sweep scores against the client's tokens, so a broken capture shows as a falling score."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
import torch

from threat_model.sweep import attack_sweep, frame_capture


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread() -> Iterator[None]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def setup() -> tuple[Any, list[int]]:
    ls = pytest.importorskip("lambda_split")
    checkpoint = ls.resolve("tiny-random-llama")
    ids, _ = ls.encode_prompts(checkpoint.tokenizer, ["My PIN is 4921, my name is Ann."], chat=False)
    return checkpoint, [int(i) for i in ids[0]]


def scores(rows: list[dict[str, Any]]) -> dict[str, float]:
    return {r["attack"]: r["accuracy"] for r in rows}


def test_frame_capture_is_the_codec_round_trip() -> None:
    x = torch.randn(1, 5, 64)
    assert torch.equal(frame_capture(x, "fp32"), x)
    assert torch.equal(frame_capture(x, "fp16"), x.half().float())


def test_random_trunk_outputs_make_the_scores_fall(setup: tuple[Any, list[int]]) -> None:
    checkpoint, ids = setup
    honest = scores(attack_sweep(checkpoint, ids, depths=(2,), wires=("fp16",), new_tokens=6))
    assert honest["inversion"] == honest["tail_replay"] == 1.0
    generator = torch.Generator().manual_seed(0)

    def noise(tensor: torch.Tensor, wire: str) -> torch.Tensor:
        return torch.randn(tensor.shape, generator=generator) * float(tensor.std())

    planted = scores(attack_sweep(checkpoint, ids, depths=(2,), wires=("fp16",), new_tokens=6, capture=noise))
    assert planted["inversion"] < 0.5, planted
    assert planted["tail_replay"] < 0.5, planted
