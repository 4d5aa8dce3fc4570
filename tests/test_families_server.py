"""Every supported family through a live trunk server (plain mode, loopback), batched executor included."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from lambda_split import Checkpoint, GenerationConfig, SplitClient, encode_prompts, resolve
from lambda_split._names import TINY_FAMILY_MODELS
from tests.conftest import monolithic
from tests.helpers import reference_tokens
from tests.server.conftest import LiveServer, start_server

PROMPTS = ["What is the capital of France?", "Hi", "Tell me a long story about a dragon and a brave knight."]
GREEDY = GenerationConfig(max_new_tokens=16)


@pytest.fixture(scope="module", params=sorted(TINY_FAMILY_MODELS))
def served(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[LiveServer, Checkpoint]]:
    keys: Path = tmp_path_factory.mktemp("unused-keys")  # plain mode reads no keys
    checkpoint = resolve(request.param)
    server = start_server(checkpoint, "plain", keys, split="3:5")
    yield server, checkpoint
    server.stop()


@pytest.mark.heavy
def test_a_live_server_gives_the_generate_tokens(served: tuple[LiveServer, Checkpoint]) -> None:
    server, checkpoint = served
    ids, mask = encode_prompts(checkpoint.tokenizer, PROMPTS, chat=False)
    expected = reference_tokens(monolithic(checkpoint), ids, mask, 16, checkpoint.tokenizer.eos_token_id)
    with SplitClient.connect(server.url, security="plain", model=checkpoint) as client:
        # A left-padded batch in one session, then a prompt alone in a new session that reuses
        # the freed KV slots of the first: nothing of the batch may leak into it.
        assert client.generate_ids(ids, mask, GREEDY).token_ids == expected
        assert client.generate(PROMPTS[2], GREEDY, chat=False).token_ids == [expected[2]]
    stats = server.service.batching
    assert stats is not None and stats["steps"] > 0  # the steps ran through the batching executor
