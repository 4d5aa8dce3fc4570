"""`lambda-split local --head-depth random|N`: each conversation opens its trunk session at one head
depth (drawn once under ``random``) and keeps it, with the head that stops there, for all its turns.

The trunk server runs split 2:6 of tiny-random-llama with head depths 1:4. Every depth computes the
same model, so a matching answer shows that the conversation's head and trunk session agree on the
depth (a head that stopped elsewhere would skip or repeat layers); the depth itself is read where
the server opened the session.
"""

from __future__ import annotations

import itertools
import json
import subprocess
import sys
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from typing import Any

import httpx
import openai
import pytest
import torch
from selenium import webdriver
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import WebDriverWait

import lambda_split._client
from lambda_split import Checkpoint, GenerationConfig, SplitClient, load_llm_service
from lambda_split._head_depth import HeadDepths
from lambda_split.cli import main
from lambda_split.local_api import LocalEngine, parse_chat_request
from server import BackgroundServer, ServerConfig
from tests.local.conftest import MODE
from tests.local.test_chat_page import browser  # noqa: F401 (fixture)
from tests.secure_channel.conftest import PKI
from tests.server.conftest import LiveServer, wait_for

PROMPT = "Name three colours of the rainbow."


@pytest.fixture(scope="module")
def ranged(tiny: Checkpoint, server_pki: PKI) -> Iterator[LiveServer]:
    service = load_llm_service(tiny, "2:6", security=MODE, head_depths="1:4")
    config = ServerConfig(
        model=tiny.name, split="2:6", head_depths="1:4", security=MODE, keys=str(server_pki.root), port=0
    )
    running = BackgroundServer(config, service)
    server = LiveServer(MODE, running.url, server_pki.root, service[0], running)
    yield server
    server.stop()


@pytest.fixture
def opened(ranged: LiveServer, monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The head depth of every session the server opens from now on, as the server opened it."""
    depths: list[int] = []
    real = ranged.service.open_session

    def watch(*args: Any, **kwargs: Any) -> Any:
        reply = real(*args, **kwargs)
        depths.append(reply["head_depth"])
        return reply

    monkeypatch.setattr(ranged.service, "open_session", watch)
    return depths


@pytest.fixture
def connect(ranged: LiveServer) -> Iterator[Callable[[Any], SplitClient]]:
    """``connect(head_depth)``: a client of ``ranged`` (closed after the test)."""
    with ExitStack() as stack:

        def make(head_depth: Any) -> SplitClient:
            client = SplitClient.connect(
                ranged.url,
                security=MODE,
                keys=ranged.keys,
                model="tiny-random-llama",
                transport_kind="http",
                head_depth=head_depth,
            )
            return stack.enter_context(client)

        yield make


def ask(url: str, messages: list[dict[str, str]], max_tokens: int) -> tuple[str, int, int]:
    """One greedy turn with the real openai client: (answer, cached tokens, the answer's head depth);
    the answer is appended to ``messages``."""
    with openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=120) as oai:
        reply = oai.chat.completions.create(
            model="m",
            messages=messages,  # type: ignore[arg-type]
            max_tokens=max_tokens,
            temperature=0,
        )
    answer = reply.choices[0].message.content or ""
    assert reply.usage is not None and reply.usage.prompt_tokens_details is not None
    extra = reply.model_extra or {}
    messages.append({"role": "assistant", "content": answer})
    return answer, reply.usage.prompt_tokens_details.cached_tokens or 0, extra["lambda_split"]["head_depth"]


def reference(
    client: SplitClient, engine: LocalEngine, messages: list[dict[str, str]], max_tokens: int
) -> str:
    """What ``client`` (a fixed head depth) generates, greedy, for the prompt the endpoint renders."""
    ids = torch.tensor([engine.encode(parse_chat_request({"messages": messages}))])
    return str(
        client.generate_ids(ids, torch.ones_like(ids), GenerationConfig(max_new_tokens=max_tokens)).texts[0]
    )


def test_a_fixed_depth_answers_as_generate_at_that_depth_and_the_server_sees_it(
    ranged: LiveServer,
    connect: Callable[[Any], SplitClient],
    opened: list[int],
    make_local: Callable[..., Any],
    capsys: pytest.CaptureFixture[str],
) -> None:
    local, engine = make_local(connect(3), conversations=4)
    assert engine.describe()["head_depth"] == 3 and engine.describe()["head_depths"] == [1, 4]
    info = httpx.get(local.url + "/v1/local/info", timeout=10).json()
    assert (info["head_depth"], info["head_depths"], info["split"]) == (3, [1, 4], [2, 6])

    messages = [{"role": "user", "content": PROMPT}]
    answer, cached, depth = ask(local.url, messages, 10)
    assert (cached, depth) == (0, 3) and opened == [3]
    argv = ["generate", "--server", ranged.url, "--security", MODE, "--keys", str(ranged.keys)]
    argv += ["--model", "tiny-random-llama", "--head-depth", "3", "--max-new-tokens", "10", "--json", PROMPT]
    assert main(argv) == 0
    generated = json.loads(capsys.readouterr().out)
    assert generated["stats"]["head_depth"] == 3 and answer == generated["text"]
    assert opened == [3, 3]  # generate's session, at the same depth

    # Another conversation at depth 3; its second turn continues it: no new session, same depth.
    # (Two tokens first: this random model's first token re-tokenises to itself, so reuse applies.)
    messages = [{"role": "user", "content": "Hello!"}]
    assert ask(local.url, messages, 2)[1:] == (0, 3) and opened == [3, 3, 3]
    messages.append({"role": "user", "content": "Tell me more."})
    prompt = list(messages)
    answer, cached, depth = ask(local.url, messages, 6)
    assert cached > 0 and depth == 3 and opened == [3, 3, 3]
    assert answer == reference(connect(3), engine, prompt, 6)
    assert sorted((c.depth, len(c.head.layers)) for c in engine.cache._kept) == [(3, 3), (3, 3)]


def test_random_draws_once_per_conversation_and_keeps_that_depth_for_all_its_turns(
    connect: Callable[[Any], SplitClient],
    opened: list[int],
    make_local: Callable[..., Any],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    draws, asked = itertools.cycle([4, 1, 3]), []

    def draw(depths: HeadDepths) -> int:  # the client's draw, in the server's range; fixed here
        asked.append(depths)
        return next(draws)

    monkeypatch.setattr(lambda_split._client, "choose_depth", draw)
    local, engine = make_local(connect("random"), conversations=4)
    assert engine.describe()["head_depth"] == "random"
    starts = ["Hello!", "Good morning.", "Hi there, robot."]
    conversations = [[{"role": "user", "content": text}] for text in starts]
    turns: list[list[tuple[list[dict[str, str]], int, str, int, int]]] = [[], [], []]
    # Interleaved: every conversation is kept, at its own depth, while the others take their turns.
    for turn, max_tokens in enumerate([2, 2, 4]):
        for index, messages in enumerate(conversations):
            if turn:
                messages.append({"role": "user", "content": ["Tell me more.", "Why?"][turn - 1]})
            prompt = list(messages)
            turns[index].append((prompt, max_tokens, *ask(local.url, messages, max_tokens)))
    assert asked == [HeadDepths(1, 4)] * 3  # one fresh draw per conversation, none per turn
    assert opened == [4, 1, 3]  # one trunk session per conversation, opened at its draw
    assert [[depth for *_, depth in conversation] for conversation in turns] == [[4] * 3, [1] * 3, [3] * 3]
    cached = [[reused for *_, reused, _ in conversation] for conversation in turns]
    assert all(reused[0] == 0 and reused[1] > 0 and reused[2] > 0 for reused in cached), cached
    assert sorted((c.depth, len(c.head.layers)) for c in engine.cache._kept) == [(1, 1), (3, 3), (4, 4)]
    # Each answer is what a client with that fixed depth generates for the conversation so far.
    fixed = {depth: connect(depth) for depth in (1, 3, 4)}
    for conversation in turns:
        for prompt, max_tokens, answer, _, depth in conversation:
            assert answer == reference(fixed[depth], engine, prompt, max_tokens)


def test_a_conversation_whose_session_was_lost_starts_over_at_its_own_depth(
    ranged: LiveServer,
    connect: Callable[[Any], SplitClient],
    opened: list[int],
    make_local: Callable[..., Any],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    draws = iter([4, 1])  # a second draw would give 1

    def draw(depths: HeadDepths) -> int:
        return next(draws)

    monkeypatch.setattr(lambda_split._client, "choose_depth", draw)
    local, engine = make_local(connect("random"), conversations=4)
    messages = [{"role": "user", "content": "Hello!"}]
    assert ask(local.url, messages, 2)[1:] == (0, 4)
    (kept,) = engine.cache._kept
    kept.trunk.link.close(kept.trunk.session_id)  # behind the engine's back, like an idle expiry
    assert wait_for(lambda: ranged.service.open_sessions == 0)
    messages.append({"role": "user", "content": "Tell me more."})
    prompt = list(messages)
    answer, cached, depth = ask(local.url, messages, 4)
    assert (cached, depth) == (0, 4) and opened == [4, 4]  # started over, at the depth it had
    assert answer == reference(connect(4), engine, prompt, 4)
    assert [(c.depth, len(c.head.layers)) for c in engine.cache._kept] == [(4, 4)]


LOCAL = [sys.executable, "-m", "lambda_split", "local", "--security", MODE, "--model", "tiny-random-llama"]


def test_a_depth_the_server_does_not_allow_exits_2_before_listening(
    ranged: LiveServer, capsys: pytest.CaptureFixture[str]
) -> None:
    server = ["--server", ranged.url, "--keys", str(ranged.keys)]
    argv = [
        "generate",
        "--security",
        MODE,
        "--model",
        "tiny-random-llama",
        *server,
        "--head-depth",
        "5",
        "hi",
    ]
    assert main(argv) == 2
    said = capsys.readouterr().err.strip().splitlines()[-1]
    assert said == "lambda-split: error: head depth 5; this server allows 1:4 (head_depths in /v1/info)"
    # (a local endpoint that did listen would serve until the timeout, which fails the test)
    done = subprocess.run(
        [*LOCAL, *server, "--head-depth", "5", "--port", "0"], capture_output=True, text=True, timeout=120
    )
    assert (done.returncode, done.stdout) == (2, "")
    assert done.stderr.strip().splitlines()[-1] == said and "Traceback" not in done.stderr


@pytest.mark.parametrize(
    ("depth", "message"), [("0", "head depth must be at least 1"), ("deep", "'random' or a layer number")]
)
def test_a_malformed_depth_is_a_usage_error_as_for_generate(
    capsys: pytest.CaptureFixture[str], depth: str, message: str
) -> None:
    for command in ("local", "generate"):
        argv = [
            command,
            "--server",
            "https://127.0.0.1:9",
            "--security",
            MODE,
            "--model",
            "tiny-random-llama",
        ]
        with pytest.raises(SystemExit) as exit_info:  # argparse: before anything connects or loads
            main([*argv, "--head-depth", depth])
        assert exit_info.value.code == 2 and message in capsys.readouterr().err


@pytest.mark.browser
def test_the_chat_page_names_the_head_depth(
    browser: webdriver.Chrome,  # noqa: F811
    connect: Callable[[Any], SplitClient],
    make_local: Callable[..., Any],
) -> None:
    local, _ = make_local(connect("random"))
    browser.get(local.url + "/")
    WebDriverWait(browser, 120).until(
        lambda d: d.find_element(By.TAG_NAME, "body").get_attribute("data-state") == "idle"
    )
    assert browser.find_element(By.ID, "split").text == "2:6 (head depth random in 1:4)"
