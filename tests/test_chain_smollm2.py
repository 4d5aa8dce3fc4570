"""Issue 19's acceptance run: a three-hop chain of SmolLM2-135M spans gives the monolithic greedy
tokens in every security mode (fp32 wire). Each span's trunk is loaded once and served in turn by a
server of each mode, in this process on loopback; every server is stopped before the next mode."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from lambda_split import Checkpoint, GenerationConfig, encode_prompts, load_llm_service
from lambda_split._chain import ChainClient
from server import BackgroundServer, ServerConfig
from tests.conftest import monolithic
from tests.helpers import reference_tokens
from tests.secure_channel.conftest import PKI
from tests.server.conftest import MODES

SPANS = ("2:11", "11:20", "20:28")
PROMPT = "Name three colours of the rainbow."
GREEDY = GenerationConfig(max_new_tokens=12, stop_on_eos=False)


@pytest.fixture(scope="module")
def spans(smollm2: Checkpoint) -> list[tuple[Any, dict[str, Any]]]:
    return [load_llm_service(smollm2, span, security="plain") for span in SPANS]


@pytest.mark.exhaustive  # the tiny model's three-hop chain runs in every mode on every run (tests/test_chain.py)
@pytest.mark.parametrize("mode", MODES)
def test_three_smollm2_spans_give_the_monolithic_tokens(
    smollm2: Checkpoint, spans: list[tuple[Any, dict[str, Any]]], tmp_path: Path, mode: str
) -> None:
    pki = PKI.create(tmp_path / "pki")
    ids, mask = encode_prompts(smollm2.tokenizer, [PROMPT], chat=True)
    expected = reference_tokens(monolithic(smollm2), ids, mask, GREEDY.max_new_tokens, None)[0]
    running: list[BackgroundServer] = []
    try:
        for span, (service, info) in zip(SPANS, spans, strict=True):
            config = ServerConfig(model=smollm2.name, split=span, security=mode, keys=str(pki.root), port=0)
            running.append(BackgroundServer(config, (service, {**info, "security": mode})))
        urls = [server.url for server in running]
        with ChainClient.connect(
            urls, security=mode, keys=pki.root, model=smollm2, wire="fp32", timeout=120
        ) as client:
            assert client.split == (2, 28) and [h.info.split for h in client.hops] == [
                (2, 11),
                (11, 20),
                (20, 28),
            ]
            assert all(hop.transport.security == mode for hop in client.hops)
            result = client.generate_ids(ids, mask, GREEDY)
    finally:
        for server in running:
            server.stop()
    assert result.token_ids[0] == expected
