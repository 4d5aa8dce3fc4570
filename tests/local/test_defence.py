"""`lambda-split local --defence`: every uplink hidden state of every turn goes through its
conversation's defence transform (one draw per conversation), as `generate --defence` does."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest
import torch

from lambda_split import SplitClient
from lambda_split._defences import Defence
from tests.local.conftest import MODE
from tests.local.test_reuse import converse
from tests.server.conftest import LiveServer


@pytest.fixture
def defended_client(trunk: LiveServer) -> Iterator[SplitClient]:
    with SplitClient.connect(
        trunk.url,
        security=MODE,
        keys=trunk.keys,
        model="tiny-random-llama",
        transport_kind="http",
        defence=Defence("noise", sigma=3.0, seed=11),
    ) as client:
        yield client


def test_every_uplink_state_of_every_turn_is_defended_with_one_draw_per_conversation(
    defended_client: SplitClient, make_local: Callable[..., Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    transforms: list[list[tuple[int, ...]]] = []
    real = Defence.session

    def counted(self: Defence) -> Callable[[torch.Tensor], torch.Tensor]:
        transform, seen = real(self), []
        transforms.append(seen)

        def call(hidden: torch.Tensor) -> torch.Tensor:
            seen.append(tuple(hidden.shape))
            return transform(hidden)

        return call

    monkeypatch.setattr(Defence, "session", counted)
    local, engine = make_local(client=defended_client, conversations=4)
    assert engine.describe()["defence"] == "noise:3"
    defended = converse(local.url, [2, 2, 4], turns=["Hello!", "Tell me more.", "Why?"])
    # One draw per conversation: a turn that extends the kept conversation keeps its transform.
    started = [cached == 0 for _, _, cached in defended]
    assert started.count(False) >= 1, "a turn reused the kept conversation"
    assert len(transforms) == started.count(True)
    # Each turn: its new prompt tokens in one step, then one step per new token but the last.
    assert sum(len(steps) for steps in transforms) == sum(1 + (limit - 1) for limit in (2, 2, 4))
    assert all(shape[0] == 1 for steps in transforms for shape in steps)

    drawn = len(transforms)
    plain, _ = make_local(conversations=4)  # the fixture's client: no defence
    undefended = converse(plain.url, [2, 2, 4], turns=["Hello!", "Tell me more.", "Why?"])
    assert len(transforms) == drawn, "no transform without a defence"
    assert [a for a, _, _ in defended] != [a for a, _, _ in undefended], "the defence reached the trunk"
