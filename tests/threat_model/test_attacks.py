"""Known-model attacks: a plaintext frame gives away the prompt and the answer."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from threat_model.attacks import (
    cached_step_fn,
    dictionary_attack,
    invert_prompt,
    model_order_fn,
    quantisation_bound,
    ridge_probe_attack,
    tail_replay,
    wire_roundtrip,
)

WIRES = ["fp32", "fp16", "bf16", "int8"]
PROMPT = "My PIN is 4921."


@pytest.fixture(scope="module")
def tiny() -> Any:
    ls = pytest.importorskip("lambda_split")
    checkpoint = ls.resolve("tiny-random-llama")
    spec = ls.SplitSpec.parse("2:-2", checkpoint.config.num_hidden_layers)
    return ls.load_parts(checkpoint, spec, ("head", "trunk", "tail")), checkpoint.tokenizer


def full_logits(parts: Any) -> Any:
    return lambda ids: parts.tail(parts.trunk(parts.head(ids)))


@torch.inference_mode()
def greedy_session(
    parts: Any, ids: torch.Tensor, steps: int, wire: str
) -> tuple[list[torch.Tensor], list[int]]:
    """Run a split session locally; return what the trunk sent back (as decoded) and the tokens."""
    states = [parts.head.new_state(), parts.trunk.new_state(), parts.tail.new_state()]
    returned, generated, x = [], [], ids
    for _ in range(steps):
        sent = wire_roundtrip(parts.head(x, state=states[0]), wire)
        back = wire_roundtrip(parts.trunk(sent, state=states[1]), wire)
        returned.append(back)
        token = int(parts.tail(back, state=states[2])[0, -1].argmax())
        generated.append(token)
        x = torch.tensor([[token]])
    return returned, generated


@pytest.mark.parametrize("wire", WIRES)
def test_wire_roundtrip_is_what_the_codec_decodes(wire: str) -> None:
    protocol = pytest.importorskip("lambda_split.protocol")
    x = torch.randn(2, 3, 64) * 5
    encoding = protocol.Encoding.parse(wire)
    frame = protocol.encode_frame(protocol.FrameKind.LLM_STEP, b"s" * 16, 1, {"hidden": (x, encoding)})
    assert torch.equal(protocol.decode_frame(frame).tensors["hidden"], wire_roundtrip(x, wire))


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**16), scale=st.floats(1e-3, 1e3), wire=st.sampled_from(WIRES))
def test_quantisation_bound_holds(seed: int, scale: float, wire: str) -> None:
    row = torch.randn(192, generator=torch.Generator().manual_seed(seed)) * scale
    row[seed % 192] *= 40  # an outlier channel
    assert float((wire_roundtrip(row, wire) - row).norm()) <= quantisation_bound(
        wire_roundtrip(row, wire), wire
    )


@pytest.mark.parametrize("wire", ["fp16", "int8"])
def test_tail_replay_recovers_the_generated_tokens(tiny: Any, wire: str) -> None:
    parts, tokenizer = tiny
    ids = tokenizer(PROMPT, return_tensors="pt")["input_ids"]
    returned, generated = greedy_session(parts, ids, steps=8, wire=wire)
    result = tail_replay(returned, parts.tail, prompt_length=ids.shape[1], truth=generated)
    assert result.accuracy == 1.0
    noise = [torch.randn_like(t) * t.std() for t in returned]  # negative control
    assert tail_replay(noise, parts.tail, prompt_length=ids.shape[1], truth=generated).accuracy < 0.5


@pytest.mark.parametrize("wire", ["fp16", "int8"])
def test_sipit_inverts_the_prompt_exactly_through_rounding(tiny: Any, wire: str) -> None:
    parts, tokenizer = tiny
    ids = tokenizer(PROMPT, return_tensors="pt")["input_ids"]
    with torch.inference_mode():
        captured = wire_roundtrip(parts.head(ids), wire)
    order = model_order_fn(full_logits(parts), parts.config.vocab_size, tokenizer.bos_token_id)
    result = invert_prompt(
        captured,
        None,
        order,
        encoding=wire,
        truth=ids[0].tolist(),
        step_fn=cached_step_fn(parts.head),
        batch_size=64,
    )
    assert result.accuracy == 1.0
    assert tokenizer.decode(result.recovered) == PROMPT
    assert all(
        d <= quantisation_bound(row, wire) for d, row in zip(result.distances, captured[0], strict=True)
    )
    assert result.forwards_per_token <= parts.config.vocab_size


def test_sipit_cached_and_recomputed_steps_agree(tiny: Any) -> None:
    parts, tokenizer = tiny
    ids = tokenizer("abc", return_tensors="pt")["input_ids"]
    with torch.inference_mode():
        captured = wire_roundtrip(parts.head(ids), "fp16")
    order = model_order_fn(full_logits(parts), parts.config.vocab_size, tokenizer.bos_token_id)
    slow = invert_prompt(captured, parts.head, order, encoding="fp16", batch_size=64)
    fast = invert_prompt(
        captured, None, order, encoding="fp16", step_fn=cached_step_fn(parts.head), batch_size=64
    )
    assert slow.recovered == fast.recovered == ids[0].tolist()


def test_sipit_on_noise_finds_nothing_close(tiny: Any) -> None:
    parts, tokenizer = tiny
    ids = tokenizer("hi", return_tensors="pt")["input_ids"]
    with torch.inference_mode():
        real = parts.head(ids)
    noise = torch.randn_like(real) * real.std()
    order = model_order_fn(full_logits(parts), parts.config.vocab_size, tokenizer.bos_token_id)
    result = invert_prompt(noise, None, order, encoding="fp16", step_fn=cached_step_fn(parts.head))
    assert all(
        d > 10 * quantisation_bound(row, "fp16") for d, row in zip(result.distances, noise[0], strict=True)
    )
    assert result.forwards_per_token == parts.config.vocab_size  # never stopped early


def test_cheap_probes_beat_chance_and_fail_on_noise(tiny: Any) -> None:
    parts, tokenizer = tiny
    ids = tokenizer("The quick brown fox jumps over the lazy dog", return_tensors="pt")["input_ids"]
    with torch.inference_mode():
        captured = wire_roundtrip(parts.head(ids), "fp16")
    truth = ids[0].tolist()
    vocab = parts.config.vocab_size
    ridge = ridge_probe_attack(
        captured, parts.head, parts.head.embed_tokens.weight, truth=truth, train_sequences=16
    )
    lookup = dictionary_attack(captured, parts.head, vocab, truth=truth)
    assert ridge.accuracy is not None and ridge.accuracy > 0.3
    assert lookup.accuracy is not None and lookup.accuracy > 0.3
    noise = torch.randn_like(captured) * captured.std()
    assert (dictionary_attack(noise, parts.head, vocab, truth=truth).accuracy or 0) < 0.2


def test_attacks_plug_into_a_hand_sliced_transformers_model() -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=97,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    model = LlamaForCausalLM(config).eval()
    torch.nn.init.normal_(model.model.embed_tokens.weight, std=1.0)

    def head_fn(ids: torch.Tensor) -> torch.Tensor:
        return model(ids, output_hidden_states=True).hidden_states[1]  # after layer 0

    def logits_fn(ids: torch.Tensor) -> torch.Tensor:
        return model(ids).logits

    ids = torch.randint(0, 97, (1, 6))
    with torch.inference_mode():
        captured = wire_roundtrip(head_fn(ids), "bf16")
    result = invert_prompt(
        captured, head_fn, model_order_fn(logits_fn, 97), encoding="bf16", truth=ids[0].tolist()
    )
    assert result.accuracy == 1.0
