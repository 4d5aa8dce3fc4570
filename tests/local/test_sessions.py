"""Trunk sessions behind the local endpoint: one per concurrent request, ended by a disconnect."""

from __future__ import annotations

import json
import threading
from collections.abc import Callable
from typing import Any

import httpx
import openai

from lambda_split import GenerationConfig, SplitClient
from tests.server.conftest import LiveServer, wait_for

PROMPTS = ["Why is the sky blue?", "Count to five.", "Say hello."]


def test_concurrent_streams_each_get_their_own_session(
    split_client: SplitClient, trunk: LiveServer, make_local: Callable[..., Any]
) -> None:
    """Over both links: the HTTP one, and the one stream that carries every session of the client."""
    local, _ = make_local(split_client, conversations=0)
    references = [split_client.generate(p, GenerationConfig(max_new_tokens=16)).texts[0] for p in PROMPTS]
    answers: dict[int, str] = {}
    most_sessions = 0
    start = threading.Barrier(len(PROMPTS))

    def ask(index: int) -> None:
        start.wait()
        with openai.OpenAI(base_url=local.url + "/v1", api_key="unused", max_retries=0) as oai:
            stream = oai.chat.completions.create(
                model="m",
                messages=[{"role": "user", "content": PROMPTS[index]}],
                max_tokens=16,
                stream=True,
                temperature=0,
            )
            parts = []
            for chunk in stream:
                nonlocal most_sessions
                most_sessions = max(most_sessions, trunk.service.open_sessions)
                parts.extend(c.delta.content or "" for c in chunk.choices)
        answers[index] = "".join(parts)

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(len(PROMPTS))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(300)
    assert [answers.get(i) for i in range(len(PROMPTS))] == references
    assert most_sessions >= 2  # they ran side by side, each in a session of its own
    assert wait_for(lambda: trunk.service.open_sessions == 0)


def test_a_client_that_disconnects_mid_stream_ends_its_trunk_session(
    split_client: SplitClient, trunk: LiveServer, make_local: Callable[..., Any]
) -> None:
    """With conversations kept, a finished answer would keep its session: a cancelled one must not."""
    local, engine = make_local(split_client, conversations=4)
    assert wait_for(lambda: trunk.service.open_sessions == 0)
    body = {
        "messages": [{"role": "user", "content": "Talk for a long time."}],
        "max_tokens": 900,
        "ignore_eos": True,  # a random model may end early, and a finished answer keeps its session
        "stream": True,
    }
    with (
        httpx.Client(timeout=60) as http,
        http.stream("POST", local.url + "/v1/chat/completions", json=body) as reply,
    ):
        assert reply.status_code == 200, reply.read()
        seen = 0
        for line in reply.iter_lines():
            if line.startswith("data: {"):
                seen += 1
                assert json.loads(line[6:])["choices"][0]["finish_reason"] is None
            if seen == 4:
                assert trunk.service.open_sessions == 1
                break  # leaving the block closes the connection mid-answer
    assert seen == 4
    assert wait_for(lambda: trunk.service.open_sessions == 0, timeout=60)
    assert len(engine.cache) == 0
