"""Split generation gives token for token what the monolithic model gives."""

from __future__ import annotations

import pytest
import torch

from lambda_split import Checkpoint, GenerationConfig, encode_prompts
from lambda_split._parts import PART_NAMES, SplitModel, SplitSpec, load_parts
from tests.conftest import monolithic
from tests.helpers import local_client, reference_tokens

PROMPTS = ["What is the capital of France?", "Hi", "Tell me a long story about a dragon and a brave knight."]
GREEDY_64 = GenerationConfig(max_new_tokens=64)
# Each of the real model's tokens costs 135M parameters' worth: half as many as the tiny model's 64.
SMOLLM2_TOKENS = 32


def check_split_matches(
    checkpoint: Checkpoint,
    split: str,
    prompts: list[str],
    expected: list[list[int]] | None = None,
    new_tokens: int = 64,
) -> None:
    client, _ = local_client(checkpoint, split)
    ids, mask = encode_prompts(client.tokenizer, prompts, chat=True)
    if expected is None:
        expected = reference_tokens(
            monolithic(checkpoint), ids, mask, new_tokens, client.tokenizer.eos_token_id
        )
    got = client.generate_ids(ids, mask, GenerationConfig(max_new_tokens=new_tokens)).token_ids
    assert got == expected


@pytest.mark.parametrize("split", ["1:-1", "2:-2", "4:4", "1:8", "3:5"])
def test_tiny_split_matches_monolithic_for_a_batch(tiny: Checkpoint, split: str) -> None:
    check_split_matches(tiny, split, PROMPTS)


def test_tiny_batch_rows_equal_their_solo_runs(tiny: Checkpoint) -> None:
    client, _ = local_client(tiny, "2:-2")
    batch = client.generate(PROMPTS, GREEDY_64).token_ids
    assert batch == [client.generate(p, GREEDY_64).token_ids[0] for p in PROMPTS]


@pytest.fixture(scope="module")
def smollm2_reference(smollm2: Checkpoint) -> list[list[int]]:
    """transformers' greedy tokens for PROMPTS: the same for every cut, so computed once."""
    ids, mask = encode_prompts(smollm2.tokenizer, PROMPTS, chat=True)
    return reference_tokens(monolithic(smollm2), ids, mask, SMOLLM2_TOKENS, smollm2.tokenizer.eos_token_id)


# The product's default cut on the real model; the other cut shapes (one-layer head and tail, an
# empty trunk) are covered on every run by the tiny model above, and on smollm2 by `make test-all`.
@pytest.mark.heavy
@pytest.mark.parametrize(
    "split",
    [
        pytest.param("1:-1", marks=pytest.mark.exhaustive),
        "2:-2",
        pytest.param("15:15", marks=pytest.mark.exhaustive),
    ],
)
def test_smollm2_split_matches_monolithic_for_a_batch(
    smollm2: Checkpoint, smollm2_reference: list[list[int]], split: str
) -> None:
    check_split_matches(smollm2, split, PROMPTS, smollm2_reference, SMOLLM2_TOKENS)


@pytest.mark.heavy
def test_smollm2_answers_sensibly(smollm2: Checkpoint) -> None:
    client, _ = local_client(smollm2, "2:-2")
    assert (
        "Paris"
        in client.generate("What is the capital of France?", GenerationConfig(max_new_tokens=16)).texts[0]
    )


def test_parts_hold_only_their_own_weights(tiny: Checkpoint) -> None:
    from lambda_split import SplitSpec, load_parts

    spec = SplitSpec.parse("2:-2", 8)
    device = load_parts(tiny, spec, ("head", "tail"))
    server = load_parts(tiny, spec, ("trunk",))
    assert device.trunk is None and server.head is None and server.tail is None
    assert server.trunk is not None and device.head is not None and device.tail is not None
    trunk_names = {name for name, _ in server.trunk.named_parameters()}
    assert not any("embed" in n or "lm_head" in n or n.startswith("norm") for n in trunk_names)
    assert len(server.trunk.layers) == 4 and len(device.head.layers) == 2 and len(device.tail.layers) == 2
    for module in (device.head, device.tail, server.trunk):
        assert all(p.device.type == "cpu" for p in module.parameters())  # nothing left on meta
    trunk_params = sum(p.numel() for p in server.trunk.parameters())
    per_layer = trunk_params // 4
    assert sum(p.numel() for p in device.head.layers.parameters()) == 2 * per_layer


def test_split_spec_parsing() -> None:
    from lambda_split import SplitSpec

    assert SplitSpec.parse("2:-2", 30) == SplitSpec(2, 28, 30)
    assert SplitSpec.parse("4:4", 30).layers("trunk") == range(4, 4)
    for bad in ("0:4", "5:4", "2:31", "x", "2:-31", "2"):
        with pytest.raises(ValueError):
            SplitSpec.parse(bad, 30)


def test_fingerprint_is_stable_and_sensitive(tiny: Checkpoint) -> None:
    from lambda_split import fingerprint, resolve

    assert fingerprint(tiny, (2, 6)) == fingerprint(resolve("tiny-random-llama"), (2, 6))
    assert fingerprint(tiny, (2, 6)) != fingerprint(tiny, (2, 5))


def test_attack_surface_shapes_are_the_models(tiny: Checkpoint) -> None:
    client, _ = local_client(tiny, "2:-2")
    hidden = client.head(torch.tensor([[1, 2, 3]]))
    assert hidden.shape == (1, 3, 64)


def _steps(parts: SplitModel, *, forget: bool) -> list[torch.Tensor]:
    """Trunk outputs and tail logits over an unpadded prompt and four one-token steps, then over a
    left-padded batch of two rows and four steps; ``forget``: every step asks transformers for its masks."""
    assert parts.head is not None and parts.trunk is not None and parts.tail is not None
    stacks = (parts.head, parts.trunk, parts.tail)
    out: list[torch.Tensor] = []
    for ids, mask in (
        (torch.tensor([[5, 9, 2, 7]]), torch.ones(1, 4, dtype=torch.long)),
        (torch.tensor([[0, 0, 3, 8], [4, 6, 1, 2]]), torch.tensor([[0, 0, 1, 1], [1, 1, 1, 1]])),
    ):
        states = [stack.new_state() for stack in stacks]
        for step in range(5):
            if forget:
                for stack in stacks:
                    stack._maskless_steps.clear()
            hidden = parts.trunk(parts.head(ids, mask, states[0]), mask, states[1])
            out += [hidden, parts.tail(hidden, mask, states[2])]
            ids = (ids[:, -1:] + step + 1) % 50
            mask = torch.ones_like(ids)
    return out


@torch.inference_mode()
def test_a_decode_step_without_padding_skips_the_mask_builder_and_computes_the_same(tiny: Checkpoint) -> None:
    spec = SplitSpec.parse("2:-2", tiny.config.num_hidden_layers)
    parts = load_parts(tiny, spec, PART_NAMES)
    remembered = _steps(parts, forget=False)
    # the unpadded steps took the shortcut; the padded batch's steps (a mask with zeros) did not
    assert all(stack is not None and stack._maskless_steps for stack in (parts.head, parts.trunk, parts.tail))
    asked = _steps(load_parts(tiny, spec, PART_NAMES), forget=True)
    assert len(remembered) == len(asked) == 20
    for got, expected in zip(remembered, asked, strict=True):
        assert torch.equal(got, expected)
