"""Decoding options of the device-side loop."""

from __future__ import annotations

import pytest

from lambda_split import Checkpoint, GenerationConfig
from tests.helpers import local_client


def test_seeded_sampling_is_reproducible_and_differs_from_greedy(tiny: Checkpoint) -> None:
    client, _ = local_client(tiny, "2:-2")
    sample = GenerationConfig(max_new_tokens=32, temperature=1.5, top_k=50, top_p=0.95, seed=7)
    first = client.generate("hello", sample).token_ids
    assert first == client.generate("hello", sample).token_ids
    assert (
        first
        != client.generate("hello", GenerationConfig(max_new_tokens=32, temperature=1.5, seed=8)).token_ids
    )
    assert first != client.generate("hello", GenerationConfig(max_new_tokens=32)).token_ids


def test_streaming_yields_the_final_text(tiny: Checkpoint) -> None:
    client, _ = local_client(tiny, "2:-2")
    config = GenerationConfig(max_new_tokens=24)
    assert "".join(client.stream("hello", config)) == client.generate("hello", config).texts[0]


def test_stop_string_ends_the_row_and_is_cut(tiny: Checkpoint) -> None:
    client, _ = local_client(tiny, "2:-2")
    full = client.generate("hello", GenerationConfig(max_new_tokens=40)).texts[0]
    stop = full[10:13]
    cut = client.generate("hello", GenerationConfig(max_new_tokens=40, stop_strings=(stop,)))
    assert cut.texts[0] == full[: full.find(stop)]
    assert len(cut.token_ids[0]) < 40


def test_eos_stops_generation() -> None:
    from lambda_split import resolve

    client, _ = local_client(resolve("tiny-random-llama"), "2:-2")
    result = client.generate("Hi", GenerationConfig(max_new_tokens=64))
    eos = client.tokenizer.eos_token_id
    for row in result.token_ids:
        assert eos not in row[:-1]


@pytest.mark.parametrize(
    "kwargs", [{"max_new_tokens": 0}, {"temperature": -1.0}, {"top_p": 0.0}, {"top_p": 1.5}, {"top_k": -1}]
)
def test_bad_generation_settings_are_refused(kwargs: dict[str, float]) -> None:
    with pytest.raises(ValueError):
        GenerationConfig(**kwargs)  # type: ignore[arg-type]


def test_prompt_buckets_hide_the_prompt_length_and_keep_the_output(tiny: Checkpoint) -> None:
    from secure_channel import Request, Response

    client, _ = local_client(tiny, "2:-2")
    prefill_sizes: list[int] = []
    exchange = client.transport.exchange

    def recording(request: Request) -> Response:
        if request.path.endswith("/step"):
            prefill_sizes.append(len(request.content))
        return exchange(request)

    client.transport.exchange = recording  # type: ignore[method-assign]

    def run(prompt: str) -> tuple[list[int], int]:
        prefill_sizes.clear()
        tokens = client.generate(prompt, GenerationConfig(max_new_tokens=6)).token_ids[0]
        return tokens, prefill_sizes[0]

    prompts = ("hi", "hello there!")  # both under 64 tokens with the chat template
    plain = [run(p) for p in prompts]
    client.prompt_bucket = 64
    padded = [run(p) for p in prompts]
    assert [tokens for tokens, _ in padded] == [tokens for tokens, _ in plain]
    assert plain[0][1] != plain[1][1] and padded[0][1] == padded[1][1]
