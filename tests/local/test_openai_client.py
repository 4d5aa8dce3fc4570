"""The unmodified ``openai`` package against the local endpoint gets what SplitClient.generate gets."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable
from typing import Any

import openai
import pytest

from lambda_split import GenerationConfig, SplitClient
from tests.local.conftest import MODE
from tests.server.conftest import LiveServer

PROMPT = "Name three colours of the rainbow."


def greedy(client: SplitClient, prompt: str, max_new_tokens: int) -> Any:
    return client.generate(prompt, GenerationConfig(max_new_tokens=max_new_tokens))


def test_non_streaming_answer_and_usage_match_generate(make_local: Callable[..., Any]) -> None:
    local, engine = make_local(conversations=0)
    reference = greedy(engine.client, PROMPT, 12)
    prompt_ids = engine.client.tokenizer.apply_chat_template(
        [{"role": "user", "content": PROMPT}], add_generation_prompt=True, tokenize=True, return_dict=True
    )["input_ids"]
    with openai.OpenAI(base_url=local.url + "/v1", api_key="unused", max_retries=0) as oai:
        reply = oai.chat.completions.create(
            model="whatever-the-app-has",
            messages=[{"role": "user", "content": PROMPT}],
            max_tokens=12,
            temperature=0,
        )
    assert reply.choices[0].message.content == reference.texts[0]
    assert reply.choices[0].message.role == "assistant"
    assert reply.choices[0].finish_reason == "length"  # a random model never ends on its own
    assert reply.model == "tiny-random-llama"
    assert reply.usage is not None
    assert reply.usage.prompt_tokens == len(prompt_ids)
    assert reply.usage.completion_tokens == len(reference.token_ids[0]) == 12
    assert reply.usage.total_tokens == len(prompt_ids) + 12


def test_streaming_deltas_join_to_the_same_answer(
    split_client: SplitClient, make_local: Callable[..., Any]
) -> None:
    """Over both links to the trunk (one request per step, one persistent stream)."""
    local, _ = make_local(split_client, conversations=0)
    reference = greedy(split_client, PROMPT, 12)
    with openai.OpenAI(base_url=local.url + "/v1", api_key="unused", max_retries=0) as oai:
        chunks = list(
            oai.chat.completions.create(
                model="m",
                messages=[{"role": "user", "content": PROMPT}],
                max_completion_tokens=12,
                temperature=0,
                stream=True,
                stream_options={"include_usage": True},
            )
        )
    assert chunks[0].choices[0].delta.role == "assistant"
    with_choices = [c for c in chunks if c.choices]
    assert [c.choices[0].finish_reason for c in with_choices] == [None] * (len(with_choices) - 1) + ["length"]
    text = "".join(c.choices[0].delta.content or "" for c in with_choices)
    assert text == reference.texts[0]
    assert not chunks[-1].choices and chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens == 12
    assert all(c.usage is None for c in chunks[:-1])


def test_stop_strings_and_seeded_sampling(make_local: Callable[..., Any]) -> None:
    local, engine = make_local(conversations=0)
    full = greedy(engine.client, PROMPT, 12).texts[0]
    stop = full[3:5]
    expected = engine.client.generate(
        PROMPT, GenerationConfig(max_new_tokens=12, stop_strings=(stop,))
    ).texts[0]
    sampled = engine.client.generate(
        PROMPT, GenerationConfig(max_new_tokens=8, temperature=0.9, top_p=0.8, seed=7)
    )
    with openai.OpenAI(base_url=local.url + "/v1", api_key="unused", max_retries=0) as oai:
        cut = oai.chat.completions.create(
            model="m",
            messages=[{"role": "user", "content": PROMPT}],
            max_tokens=12,
            temperature=0,
            stop=[stop],
        )
        again = oai.chat.completions.create(
            model="m",
            messages=[{"role": "user", "content": PROMPT}],
            max_tokens=8,
            temperature=0.9,
            top_p=0.8,
            seed=7,
        )
    assert cut.choices[0].message.content == expected == full[: full.index(stop)]
    assert cut.choices[0].finish_reason == "stop"
    assert again.choices[0].message.content == sampled.texts[0]


def test_models_lists_the_local_model(make_local: Callable[..., Any]) -> None:
    local, _ = make_local()
    with openai.OpenAI(base_url=local.url + "/v1", api_key="unused", max_retries=0) as oai:
        assert [m.id for m in oai.models.list()] == ["tiny-random-llama"]
        assert oai.models.retrieve("tiny-random-llama").owned_by == "lambda-split"


def test_same_answer_as_the_generate_command(trunk: LiveServer, make_local: Callable[..., Any]) -> None:
    local, _ = make_local(conversations=0)
    command = [sys.executable, "-m", "lambda_split", "generate", "--server", trunk.url, "--security", MODE]
    command += ["--keys", str(trunk.keys), "--model", "tiny-random-llama", "--max-new-tokens", "10", "--json"]
    done = subprocess.run(command, input=PROMPT, capture_output=True, text=True, timeout=300, check=True)
    generated = json.loads(done.stdout)
    with openai.OpenAI(base_url=local.url + "/v1", api_key="unused", max_retries=0) as oai:
        reply = oai.chat.completions.create(
            model="m", messages=[{"role": "user", "content": PROMPT}], max_tokens=10, temperature=0
        )
    assert reply.choices[0].message.content == generated["text"]
    assert reply.usage is not None and reply.usage.completion_tokens == len(generated["token_ids"])


@pytest.mark.parametrize(
    "messages", [[{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]]
)
def test_system_turns_go_through_the_chat_template(
    make_local: Callable[..., Any], messages: list[dict[str, str]]
) -> None:
    local, engine = make_local(conversations=0)
    tokenizer = engine.client.tokenizer
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    ids = tokenizer(text, add_special_tokens=False, return_tensors="pt")["input_ids"]
    import torch

    reference = engine.client.generate_ids(ids, torch.ones_like(ids), GenerationConfig(max_new_tokens=6))
    with openai.OpenAI(base_url=local.url + "/v1", api_key="unused", max_retries=0) as oai:
        reply = oai.chat.completions.create(model="m", messages=messages, max_tokens=6, temperature=0)  # type: ignore[arg-type]
    assert reply.choices[0].message.content == reference.texts[0]
    assert reply.usage is not None and reply.usage.prompt_tokens == ids.shape[1]
