"""The client reads the server's limits and keeps to them: long prompts are fed in chunks with the same
tokens, and what no chunking can fit is refused in tokens before any hidden state is uploaded."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import lambda_split.cli as cli
from lambda_split import (
    Checkpoint,
    GenerationConfig,
    LimitExceeded,
    LocalTransport,
    ServerInfo,
    ServiceLimits,
    SplitClient,
    SplitSpec,
    TrunkService,
    encode_prompts,
    fingerprint,
    generate_tokens,
    load_parts,
)
from lambda_split._llm_trunk import LLMExecutor
from lambda_split.protocol import PROTOCOL_VERSION
from tests.conftest import monolithic
from tests.helpers import reference_tokens
from tests.server.conftest import LiveServer, start_server

SPEC = SplitSpec(2, 6, 8)
PROMPTS = ["a long prompt, " * 6, "short"]  # left padding in the first chunks of the second row


def local_split_client(tiny: Checkpoint, limits: ServiceLimits, advertised: dict[str, Any]) -> SplitClient:
    """A client whose trunk runs in-process behind the session protocol, under ``limits``."""
    trunk = load_parts(tiny, SPEC, ("trunk",)).trunk
    service = TrunkService(LLMExecutor(trunk), limits=limits)  # type: ignore[arg-type]
    info = {
        "model": tiny.name,
        "fingerprint": fingerprint(tiny, (SPEC.start, SPEC.stop)),
        "split": [SPEC.start, SPEC.stop],
        "num_layers": 8,
        "hidden_size": 64,
        "security": "plain",
        "protocol_version": PROTOCOL_VERSION,
        "limits": advertised,
    }
    return SplitClient.from_transport(LocalTransport(service, info), tiny)


def test_chunked_prefill_gives_the_tokens_of_one_prefill_and_of_transformers(tiny: Checkpoint) -> None:
    parts = load_parts(tiny, SPEC, ("head", "trunk", "tail"))
    ids, mask = encode_prompts(tiny.tokenizer, PROMPTS, chat=True)
    assert ids.shape[1] > 64 and mask[1, :16].sum() == 0
    config = GenerationConfig(max_new_tokens=6, stop_on_eos=False)

    def run(prefill_chunk: int) -> Any:
        widths: list[int] = []

        def trunk(hidden: Any, step_mask: Any) -> Any:
            widths.append(hidden.shape[1])
            return parts.trunk(hidden, step_mask, trunk_state)

        trunk_state = parts.trunk.new_state()  # type: ignore[union-attr]
        result = generate_tokens(
            parts.head,  # type: ignore[arg-type]
            trunk,
            parts.tail,  # type: ignore[arg-type]
            tiny.tokenizer,
            ids,
            mask,
            config,
            keep_logits=True,
            prefill_chunk=prefill_chunk,
        )
        assert prefill_chunk == 0 or max(widths) <= prefill_chunk
        return result

    whole = run(0)
    assert whole.token_ids == reference_tokens(monolithic(tiny), ids, mask, 6, None)
    for chunk in (9, 64):
        chunked = run(chunk)
        assert chunked.token_ids == whole.token_ids, chunk
        for a, b in zip(whole.logits, chunked.logits, strict=True):
            assert (a - b).abs().max() < 1e-4


def test_a_server_with_a_small_step_limit_gets_the_prompt_in_chunks(tiny: Checkpoint) -> None:
    limits = ServiceLimits(max_step_tokens=16)
    client = local_split_client(tiny, limits, {"max_step_tokens": 16, "max_tokens_per_session": 4096})
    unlimited = local_split_client(tiny, ServiceLimits(), {})
    config = GenerationConfig(max_new_tokens=6)
    # Without chunking this server answers 413 step_too_large; with it, the same tokens.
    assert client.generate(PROMPTS[0], config).token_ids == unlimited.generate(PROMPTS[0], config).token_ids


def test_a_prompt_the_session_cannot_hold_is_refused_in_tokens_before_any_upload(tiny: Checkpoint) -> None:
    client = local_split_client(
        tiny, ServiceLimits(max_tokens_per_session=64), {"max_tokens_per_session": 64}
    )
    sent = client.transport.stats.bytes_sent
    with pytest.raises(LimitExceeded) as caught:
        client.generate("x" * 100, GenerationConfig(max_new_tokens=4))
    assert "this server holds at most 64 tokens per session" in str(caught.value)
    assert "the prompt is 1" in str(caught.value) and "shorten the prompt" in str(caught.value)
    assert client.transport.stats.bytes_sent == sent  # not even a session was opened
    with pytest.raises(LimitExceeded, match="lower --max-new-tokens to"):
        client.generate("x", GenerationConfig(max_new_tokens=64))


def test_older_servers_without_advertised_limits_still_work() -> None:
    info = ServerInfo.parse(
        {
            "model": "m",
            "fingerprint": "f",
            "split": [1, 2],
            "num_layers": 3,
            "hidden_size": 4,
            "security": "plain",
            "protocol_version": PROTOCOL_VERSION,
        }
    )
    assert info.limits.max_step_tokens is None and info.limits.max_tokens_per_session is None


@pytest.fixture(scope="module")
def small_server(tiny: Checkpoint, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    server = start_server(tiny, "plain", Path(tmp_path_factory.mktemp("unused")), max_tokens_per_session=512)
    yield server
    server.stop()


def test_the_cli_refuses_a_long_prompt_with_exit_2_and_a_message_in_tokens(
    small_server: LiveServer, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["generate", "--server", small_server.url, "--security", "plain", "--model", "tiny-random-llama"]
    assert cli.main([*argv, "--json", "y" * 2000]) == 2
    err = capsys.readouterr().err.splitlines()
    assert err[-1].startswith("lambda-split: error: the prompt is 2,0")
    assert "this server holds at most 512 tokens per session" in err[-1]


def test_the_client_reads_a_live_servers_session_limit(small_server: LiveServer, tiny: Checkpoint) -> None:
    with SplitClient.connect(small_server.url, security="plain", model=tiny) as client:
        client.check_limits(1, 100, 1)  # the server's advertised session limit was read
        with pytest.raises(LimitExceeded):
            client.check_limits(1, 600, 1)
        assert client.check_limits(1, 400, 1) >= 1


def test_imagine_refuses_more_steps_than_the_server_runs_before_computing_anything(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    server = start_server("tiny-random-sd", "plain", tmp_path)  # advertises max_steps_per_session 256
    out = tmp_path / "x.png"
    try:
        argv = ["imagine", "--server", server.url, "--security", "plain", "--model", "tiny-random-sd"]
        code = cli.main([*argv, "--steps", "100000", "--out", str(out), "a fox"])
    finally:
        server.stop()
    err = capsys.readouterr().err
    assert code == 2, err
    assert "100,000 steps asked for; this server runs at most 256 per image" in err.splitlines()[-1]
    assert "step 1/" not in err and not out.exists()
