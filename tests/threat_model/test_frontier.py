"""The frontier sweep: attacks that adapt to each defence beat the published one where they should,
and the quick sweep produces a well-formed table."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

import lambda_split.cli as cli
from lambda_split import Checkpoint, encode_prompts
from threat_model._adaptive import LearnedDecoder, identity, invert_depth_range, invert_view, sorted_view
from threat_model._frontier_defs import Setting, parse_setting
from threat_model._utility import PartsCache, agreement, run_session
from threat_model.attacks import cached_step_fn, model_order_fn, quantisation_bound

PROMPT = "My PIN is 4921."


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread() -> Iterator[None]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def world(tiny: Checkpoint) -> dict[str, Any]:
    parts_at = PartsCache(tiny)
    full = parts_at(2)
    order = model_order_fn(
        lambda ids: full.tail(full.trunk(full.head(ids))), 260, tiny.tokenizer.bos_token_id
    )
    ids, _ = encode_prompts(tiny.tokenizer, [PROMPT], chat=False)
    return {"parts_at": parts_at, "order": order, "ids": [int(i) for i in ids[0]], "tok": tiny.tokenizer}


def capture(world: dict[str, Any], setting: Setting, seed: int = 0) -> tuple[torch.Tensor, Any]:
    defence = setting.session(2, seed, 64)
    session = run_session(world["parts_at"], world["tok"], world["ids"], defence, new_tokens=3)
    return session.sent[0][0], session


def recovery(recovered: list[int], truth: list[int]) -> float:
    return sum(a == b for a, b in zip(recovered, truth, strict=False)) / len(truth)


def exact_match(world: dict[str, Any], captured: torch.Tensor, depth: int = 2) -> float:
    """The published attack: nearest candidate, counted only within the wire's rounding bound."""
    result = invert_view(
        captured,
        world["order"],
        cached_step_fn(world["parts_at"](depth).head),
        tolerance=lambda row: quantisation_bound(row, "fp32"),
    )
    matched = [
        t if d <= quantisation_bound(row, "fp32") else -1
        for t, d, row in zip(result.recovered, result.distances, captured, strict=True)
    ]
    return recovery(matched, world["ids"])


def adapted(world: dict[str, Any], captured: torch.Tensor, setting: Setting) -> float:
    result = invert_view(
        captured,
        world["order"],
        cached_step_fn(world["parts_at"](2).head),
        view=setting.view(),
        tolerance=setting.tolerance("fp32"),
    )
    return recovery(result.recovered, world["ids"])


def test_the_session_sends_the_defended_head_output_and_keeps_the_clients_tokens(
    world: dict[str, Any],
) -> None:
    setting = parse_setting("noise:0.5")
    captured, session = capture(world, setting, seed=4)
    with torch.inference_mode():
        clean = world["parts_at"](2).head(torch.tensor([world["ids"]]))[0]
    expected = setting.session(2, 4, 64).uplink(clean)
    assert torch.equal(captured, expected)
    plain = run_session(
        world["parts_at"], world["tok"], world["ids"], Setting("none").session(2, 0, 64), new_tokens=3
    )
    assert torch.equal(plain.sent[0][0], clean)
    assert len(session.tokens) == 3 and len(plain.tokens) == 3


def test_widened_inversion_recovers_under_small_noise_where_exact_match_fails(world: dict[str, Any]) -> None:
    setting = parse_setting("noise:0.01")
    captured, _ = capture(world, setting)
    assert exact_match(world, captured) == 0.0
    assert adapted(world, captured, setting) == 1.0
    clean, _ = capture(world, Setting("none"))
    assert exact_match(world, clean) == 1.0


def test_quantising_the_candidates_recovers_under_int2(world: dict[str, Any]) -> None:
    setting = parse_setting("quant:int2")
    captured, _ = capture(world, setting)
    assert exact_match(world, captured) == 0.0
    assert adapted(world, captured, setting) == 1.0
    # in the quantised view the true candidate is an exact match, not merely the nearest
    result = invert_view(
        captured,
        world["order"],
        cached_step_fn(world["parts_at"](2).head),
        view=setting.view(),
        tolerance=setting.tolerance("fp32"),
    )
    assert all(
        d <= quantisation_bound(row, "fp32") for d, row in zip(result.distances, captured, strict=True)
    )


def test_sorted_value_matching_breaks_the_permutation(world: dict[str, Any]) -> None:
    setting = parse_setting("permutation")
    captured, session = capture(world, setting, seed=9)
    assert exact_match(world, captured) < 0.3
    assert setting.view() is sorted_view
    assert adapted(world, captured, setting) == 1.0
    # and the session computed on the unpermuted state (the trunk "absorbs" the permutation)
    reference = run_session(
        world["parts_at"], world["tok"], world["ids"], Setting("none").session(2, 0, 64), new_tokens=3
    )
    assert session.tokens == reference.tokens


def test_the_depth_range_attacker_finds_the_sessions_depth(world: dict[str, Any]) -> None:
    setting = parse_setting("depth:1-4")
    seed = next(s for s in range(50) if setting.session(2, s, 64).depth == 3)
    captured, session = capture(world, setting, seed=seed)
    assert session.depth == 3
    assert exact_match(world, captured, depth=2) < 0.3  # the advertised depth does not fit
    steps = {d: cached_step_fn(world["parts_at"](d).head) for d in setting.depths(2)}
    depth, result = invert_depth_range(captured, world["order"], steps, tolerance=setting.tolerance("fp32"))
    assert depth == 3
    assert recovery(result.recovered, world["ids"]) == 1.0


def test_a_decoder_trained_in_the_defences_view_beats_one_trained_on_clean_states(
    world: dict[str, Any],
) -> None:
    parts = world["parts_at"](2)
    generator = torch.Generator().manual_seed(0)
    train = torch.randint(0, 260, (48, 24), generator=generator)
    setting = parse_setting("permutation")
    with torch.inference_mode():
        clean = parts.head(train).reshape(-1, 64)
    embeddings = parts.head.embed_tokens.weight.detach()
    captured, _ = capture(world, setting, seed=2)
    naive = LearnedDecoder("ridge", embeddings).fit(clean, train.reshape(-1)).decode(captured)
    viewed = LearnedDecoder("ridge", embeddings).fit(sorted_view(clean), train.reshape(-1))
    assert recovery(viewed.decode(sorted_view(captured)), world["ids"]) > recovery(naive, world["ids"]) + 0.3


def test_agreement_is_the_share_before_the_first_difference() -> None:
    assert agreement([1, 2, 3, 4], [1, 2, 3, 4]) == 1.0
    assert agreement([1, 2, 3, 4], [1, 9, 3, 4]) == 0.25
    assert agreement([1, 2], [7, 2]) == 0.0


@pytest.mark.parametrize(
    "bad", ["noise:0", "quant:int3", "depth:3-1", "depth:0-2", "shuffle", "permutation:2"]
)
def test_bad_settings_are_refused(bad: str) -> None:
    with pytest.raises(ValueError):
        parse_setting(bad)
    assert identity(torch.ones(2)).sum() == 2


@pytest.mark.heavy
def test_quick_sweep_writes_a_well_formed_table(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    argv = [
        "frontier",
        "--quick",
        "--out",
        str(tmp_path),
        "--setting",
        "noise:0.01",
        "--setting",
        "permutation",
    ]
    assert cli.main(argv) == 0
    report = json.loads((tmp_path / "frontier.json").read_text())
    assert [row["setting"] for row in report["rows"]] == ["none", "noise:0.01", "permutation"]
    for row in report["rows"]:
        for name in ("exact_inversion", "adapted_inversion", "ridge_decoder", "mlp_decoder"):
            assert 0.0 <= row["attacks"][name]["recovery"] <= 1.0
        assert row["recovery"] == max(a["recovery"] for a in row["attacks"].values())
        assert 0.0 <= row["agreement"] <= 1.0 and row["perplexity"] > 0
    none, noise, perm = report["rows"]
    assert none["agreement"] == 1.0 and none["perplexity_ratio"] == 1.0 and none["recovery"] == 1.0
    assert noise["attacks"]["exact_inversion"]["recovery"] == 0.0
    assert noise["attacks"]["adapted_inversion"]["recovery"] == 1.0
    assert perm["attacks"]["adapted_inversion"]["recovery"] == 1.0
    assert all(row["tail_replay"] == 1.0 for row in report["rows"])  # the downlink is not defended
    table = (tmp_path / "frontier.md").read_text()
    rows = [line for line in table.splitlines() if line.startswith("|")]
    assert len(rows) == 2 + 3 and len({line.count("|") for line in rows}) == 1
    assert (tmp_path / "frontier.png").read_bytes().startswith(b"\x89PNG")
    assert "Attacker's knowledge" in capsys.readouterr().out
