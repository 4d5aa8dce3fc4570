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


def test_kept_conversations_make_room_for_a_new_one_on_a_full_stream(
    split_client: SplitClient, trunk: LiveServer, make_local: Callable[..., Any]
) -> None:
    """The stream carries at most 4 sessions (the server's per-stream limit), and 4 kept
    conversations hold 4 of them: a fifth conversation closes the least recently used one."""
    local, engine = make_local(split_client, conversations=4)
    prompts = [f"Question number {n}?" for n in range(6)]
    with httpx.Client(base_url=local.url, timeout=120) as http:
        for prompt in prompts:
            body = {"messages": [{"role": "user", "content": prompt}], "max_tokens": 2, "temperature": 0}
            reply = http.post("/v1/chat/completions", json=body)
            assert reply.status_code == 200, reply.text
    assert len(engine.cache) == 4
    assert trunk.service.open_sessions == 4
    engine.close()
    assert wait_for(lambda: trunk.service.open_sessions == 0)
