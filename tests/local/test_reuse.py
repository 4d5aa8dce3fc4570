"""Multi-turn reuse: a request that extends a kept conversation feeds only its new tokens, with
exactly the answer a fresh prefill of the whole conversation gives."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import openai
import pytest

from lambda_split.local_api import ConversationCache
from tests.server.conftest import LiveServer, wait_for

TURNS = ["Hello!", "Tell me more.", "Why?", "And then?", "Thanks, bye."]


def converse(
    url: str,
    max_tokens: int | list[int],
    turns: list[str] = TURNS,
    messages: list[dict[str, str]] | None = None,
) -> list[tuple[str, int, int]]:
    """Five turns, each answer sent back as the assistant message: (answer, prompt, cached tokens).
    ``max_tokens`` is for every turn or per turn; ``messages`` (the conversation so far) is extended in place."""
    messages = [{"role": "system", "content": "You are terse."}] if messages is None else messages
    limits = max_tokens if isinstance(max_tokens, list) else [max_tokens] * len(turns)
    out = []
    with openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0) as oai:  # no hidden retries
        for turn, limit in zip(turns, limits, strict=True):
            messages.append({"role": "user", "content": turn})
            reply = oai.chat.completions.create(
                model="m",
                messages=messages,
                max_tokens=limit,
                temperature=0,  # type: ignore[arg-type]
            )
            answer = reply.choices[0].message.content or ""
            usage = reply.usage
            assert usage is not None and usage.prompt_tokens_details is not None
            out.append((answer, usage.prompt_tokens, usage.prompt_tokens_details.cached_tokens or 0))
            messages.append({"role": "assistant", "content": answer})
    return out


def test_five_turns_reuse_one_session_and_answer_as_without_reuse(
    trunk: LiveServer, make_local: Callable[..., Any]
) -> None:
    # Two tokens for each of the first four answers: the random model's first token re-tokenises to
    # itself, so each turn's prompt begins with every token the session has fed (the answer's first
    # token included). The fifth answer is longer: this model's answers differ from the fourth token on.
    reusing, engine = make_local(conversations=4)
    fresh, _ = make_local(conversations=0)
    with_reuse = converse(reusing.url, [2, 2, 2, 2, 16])
    assert len(engine.cache) == 1 and trunk.service.open_sessions == 1  # one session for all five turns
    without = converse(fresh.url, [2, 2, 2, 2, 16])
    assert [answer for answer, _, _ in with_reuse] == [answer for answer, _, _ in without]
    assert len(with_reuse[4][0]) > 6
    assert [prompt for _, prompt, _ in with_reuse] == [prompt for _, prompt, _ in without]
    assert [cached for _, _, cached in without] == [0] * 5
    cached = [cached for _, _, cached in with_reuse]
    assert cached[0] == 0
    for turn in range(1, 5):  # the previous prompt and the answer's first token were kept
        assert cached[turn] == with_reuse[turn - 1][1] + 1
    # Head, trunk session and tail hold exactly the conversation: the fifth prompt and the fifth
    # answer's tokens but its last (chosen, never fed); nothing skipped, nothing fed twice.
    (kept,) = engine.cache._kept
    fed = with_reuse[4][1] + 16 - 1
    assert len(kept.fed) == kept.head_state.seen == kept.tail_state.seen == fed
    (session,) = trunk.service._sessions.values()
    assert trunk.service.executor.state_tokens(session.state) == fed


def test_a_conversation_that_does_not_extend_the_kept_one_starts_afresh(
    make_local: Callable[..., Any],
) -> None:
    reusing, engine = make_local(conversations=4)
    fresh, _ = make_local(conversations=0)
    # Six tokens a turn: this random model's answer no longer re-tokenises to the tokens it was.
    with_reuse, without = converse(reusing.url, 6, TURNS[:3]), converse(fresh.url, 6, TURNS[:3])
    assert with_reuse == without
    assert [cached for _, _, cached in with_reuse] == [0, 0, 0]
    assert len(engine.cache) == 3


def test_a_kept_session_the_server_dropped_is_replaced_transparently(
    trunk: LiveServer, make_local: Callable[..., Any]
) -> None:
    reusing, engine = make_local(conversations=4)
    fresh, _ = make_local(conversations=0)
    messages: list[dict[str, str]] = [{"role": "system", "content": "You are terse."}]
    converse(reusing.url, 2, TURNS[:1], messages)
    (kept,) = engine.cache._kept
    kept.trunk.link.close(kept.trunk.session_id)  # behind the engine's back, like an idle expiry
    assert wait_for(lambda: trunk.service.open_sessions == 0)
    ((answer, _, cached),) = converse(reusing.url, 2, TURNS[1:2], messages)
    assert cached == 0  # reported as it ran: a fresh prefill of everything
    assert answer == converse(fresh.url, 2, TURNS[:2])[1][0]
    assert trunk.service.open_sessions == 1 and len(engine.cache) == 1


class FakeConversation:
    def __init__(self, fed: list[int]) -> None:
        self.fed, self.last_used, self.closed = fed, 0.0, False


def test_cache_takes_the_longest_kept_prefix_and_bounds_what_it_keeps() -> None:
    now = [0.0]
    cache = ConversationCache(2, 10.0, clock=lambda: now[0])
    short, long_, other = FakeConversation([1, 2]), FakeConversation([1, 2, 3]), FakeConversation([9])
    assert cache.put(short) == [] and cache.put(long_) == []  # type: ignore[arg-type]
    assert cache.take([1, 2, 3]) == (short, [])  # a prefix must leave at least one new token
    assert cache.put(short) == []  # type: ignore[arg-type]
    assert cache.take([1, 2, 3, 4]) == (long_, [])
    assert cache.put(other) == [] and cache.put(long_) == [short]  # type: ignore[arg-type]
    now[0] = 5.0
    assert cache.put(short) == [other]  # type: ignore[arg-type]
    now[0] = 16.0
    assert cache.take([5]) == (None, [long_, short])  # both idle for more than 10 s
    assert len(cache) == 0


def test_cache_of_capacity_zero_keeps_nothing() -> None:
    cache = ConversationCache(0, 10.0)
    conversation = FakeConversation([1])
    assert cache.put(conversation) == [conversation]  # type: ignore[arg-type]
    assert cache.take([1, 2]) == (None, [])
    with pytest.raises(ValueError, match="capacity"):
        ConversationCache(-1, 10.0)
