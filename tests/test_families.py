"""Every supported family: the split gives transformers' own generate() tokens, token for token.

The tiny checkpoints keep what makes each family differ at the cut (sliding windows of 5
tokens, Gemma's embedding scale, Gemma-2's alternating windows and soft-caps, GPT-2's learned
positions and tied head). Prompts are left-padded in one batch and run past every window.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from lambda_split import (
    Checkpoint,
    GenerationConfig,
    SplitSpec,
    encode_prompts,
    fingerprint,
    load_parts,
    resolve,
)
from lambda_split._families import UnsupportedArchitecture, family_of
from lambda_split._families_tiny import WINDOW
from lambda_split._kvslots import PoolBatch, SlotPool, SlotState
from lambda_split._names import BUILTIN_MODELS, TINY_FAMILY_MODELS
from lambda_split._parts import positions_from_mask
from tests.conftest import monolithic
from tests.helpers import local_client, reference_tokens

FAMILY_MODELS = sorted(TINY_FAMILY_MODELS)
PROMPTS = ["What is the capital of France?", "Hi", "Tell me a long story about a dragon and a brave knight."]
NEW_TOKENS = 12  # decoding alone runs twice past the 5-token window (the prompts are past it already)
# Two-way (the trunk runs to the end, or nothing) and three-way cuts, including a one-layer head.
SPLITS = [
    "1:8",
    "3:5",
    pytest.param("4:4", marks=pytest.mark.heavy),
    pytest.param("2:-1", marks=pytest.mark.heavy),
]


@pytest.fixture(scope="module", params=FAMILY_MODELS)
def family_model(request: pytest.FixtureRequest) -> tuple[Checkpoint, torch.nn.Module]:
    checkpoint = resolve(request.param)
    return checkpoint, monolithic(checkpoint)


def expected_tokens(checkpoint: Checkpoint, model: torch.nn.Module, prompts: list[str]) -> list[list[int]]:
    ids, mask = encode_prompts(checkpoint.tokenizer, prompts, chat=False)
    return reference_tokens(model, ids, mask, NEW_TOKENS, checkpoint.tokenizer.eos_token_id)


@pytest.mark.parametrize("split", SPLITS)
def test_split_matches_generate_for_a_left_padded_batch(
    family_model: tuple[Checkpoint, torch.nn.Module], split: str
) -> None:
    checkpoint, model = family_model
    client, _ = local_client(checkpoint, split)
    ids, mask = encode_prompts(client.tokenizer, PROMPTS, chat=False)
    assert (mask == 0).any(), "the batch must be left-padded"
    got = client.generate_ids(ids, mask, GenerationConfig(max_new_tokens=NEW_TOKENS)).token_ids
    assert got == expected_tokens(checkpoint, model, PROMPTS)


def test_split_logits_equal_the_models_logits(family_model: tuple[Checkpoint, torch.nn.Module]) -> None:
    """Logits, not just their argmax: Gemma-2's soft-cap is monotonic, greedy tokens cannot see it."""
    checkpoint, model = family_model
    parts = load_parts(checkpoint, SplitSpec.parse("3:5", 8), ("head", "trunk", "tail"))
    assert parts.head is not None and parts.trunk is not None and parts.tail is not None
    ids, mask = encode_prompts(checkpoint.tokenizer, PROMPTS, chat=False)
    with torch.inference_mode():
        split_logits = parts.tail(parts.trunk(parts.head(ids, mask), mask), mask)  # (B, T, V)
        whole = model(input_ids=ids, attention_mask=mask, position_ids=positions_from_mask(mask)).logits
    real = mask.bool()
    torch.testing.assert_close(split_logits[real], whole[real], rtol=1e-4, atol=1e-4)


def test_the_tiny_models_are_not_degenerate(family_model: tuple[Checkpoint, torch.nn.Module]) -> None:
    """Tokens that differ by prompt and over time: an echoing model would hide a wrong split."""
    checkpoint, model = family_model
    rows = expected_tokens(checkpoint, model, PROMPTS)
    assert len({tuple(row) for row in rows}) == len(rows)
    assert all(len(set(row)) >= 4 for row in rows), rows
    ids, _ = encode_prompts(checkpoint.tokenizer, PROMPTS, chat=False)
    assert ids.shape[1] > 3 * WINDOW  # every prompt of the batch runs past the sliding windows


def test_batched_trunk_rows_of_different_sessions_equal_each_session_alone(
    family_model: tuple[Checkpoint, torch.nn.Module],
) -> None:
    """The server's executor: sessions of different lengths share one forward over gathered
    KV slots, right-aligned; each row must equal its session run alone with its own cache."""
    checkpoint, _ = family_model
    trunk = load_parts(checkpoint, SplitSpec.parse("1:-1", 8), ("trunk",)).trunk
    assert trunk is not None
    generator = torch.Generator().manual_seed(0)
    lengths = [(2, 13), (1, 4), (3, 9)]  # (rows, prompt tokens) of three sessions
    hidden = [torch.randn(rows, length + 3, 64, generator=generator) for rows, length in lengths]
    masks = [torch.ones(rows, length + 3, dtype=torch.long) for rows, length in lengths]
    masks[0][1, :5] = 0  # left padding in one row
    with torch.inference_mode():
        alone = []
        for h, m, (_, length) in zip(hidden, masks, lengths, strict=True):
            own = trunk.new_state()
            outs = [trunk(h[:, :length], m[:, :length], own)]
            outs += [trunk(h[:, t : t + 1], m[:, t : t + 1], own) for t in range(length, length + 3)]
            alone.append(torch.cat(outs, dim=1))

        pool, states = SlotPool(len(trunk.layers)), [SlotState() for _ in lengths]
        batched: list[list[torch.Tensor]] = [[] for _ in lengths]
        for index, (state, (_, length)) in enumerate(zip(states, lengths, strict=True)):  # prefills
            batch = PoolBatch(pool, trunk.first, [(state, masks[index][:, :length])])
            batched[index].append(trunk.forward_batch(hidden[index][:, :length], batch))
            batch.commit()
        for step in range(3):  # decode steps of all sessions in one forward
            parts = [
                (s, m[:, ln + step : ln + step + 1])
                for s, m, (_, ln) in zip(states, masks, lengths, strict=True)
            ]
            rows = torch.cat(
                [h[:, ln + step : ln + step + 1] for h, (_, ln) in zip(hidden, lengths, strict=True)]
            )
            batch = PoolBatch(pool, trunk.first, parts)
            out = trunk.forward_batch(rows, batch)
            batch.commit()
            for index, piece in enumerate(torch.split(out, [r for r, _ in lengths])):
                batched[index].append(piece)
    for index, (count, _) in enumerate(lengths):
        together = torch.cat(batched[index], dim=1)
        real = masks[index].bool()
        largest = float(alone[index].abs().max())  # float noise of a different summation order
        torch.testing.assert_close(together[real], alone[index][real], rtol=1e-4, atol=1e-5 * largest)
        assert together.shape[0] == count


def test_fingerprint_covers_the_trunk_layers_of_every_family(
    family_model: tuple[Checkpoint, torch.nn.Module],
) -> None:
    checkpoint, _ = family_model
    assert fingerprint(checkpoint, (2, 6)) == fingerprint(resolve(checkpoint.name), (2, 6))
    assert fingerprint(checkpoint, (2, 6)) != fingerprint(checkpoint, (2, 5))
    assert fingerprint(checkpoint, (2, 6)) != fingerprint(resolve("tiny-random-llama"), (2, 6))


def test_the_tiny_family_names_are_built_in() -> None:
    assert set(FAMILY_MODELS) <= set(BUILTIN_MODELS)
    assert {resolve(name).config.model_type for name in FAMILY_MODELS} >= {
        "qwen2", "mistral", "gemma2", "phi3", "gpt2"
    }  # fmt: skip


def _model_directory(tmp_path: Path, config: dict[str, object]) -> Path:
    from safetensors.torch import save_file

    (tmp_path / "config.json").write_text(json.dumps(config))
    save_file({"unused": torch.zeros(1)}, str(tmp_path / "model.safetensors"))
    return tmp_path


def test_an_unsupported_architecture_is_refused_by_name_before_loading(tmp_path: Path) -> None:
    from transformers import GPTNeoXConfig

    config = GPTNeoXConfig(num_hidden_layers=2, hidden_size=32, num_attention_heads=2).to_dict()
    config["architectures"] = ["GPTNeoXForCausalLM"]
    with pytest.raises(UnsupportedArchitecture, match=r"GPTNeoXForCausalLM.*gpt_neox"):
        resolve(str(_model_directory(tmp_path, config)))


def test_a_refused_switch_of_a_supported_family_is_named() -> None:
    config = resolve("tiny-random-gpt2").config
    config_dict = config.to_dict() | {"add_cross_attention": True}
    bad = type(config).from_dict(config_dict)
    with pytest.raises(UnsupportedArchitecture, match="add_cross_attention"):
        family_of(bad)


def test_unknown_layer_types_are_refused() -> None:
    config = resolve("tiny-random-gemma2").config
    bad = type(config).from_dict(config.to_dict())
    bad.layer_types = ["chunked_attention"] * 8
    with pytest.raises(UnsupportedArchitecture, match="chunked_attention"):
        family_of(bad)
