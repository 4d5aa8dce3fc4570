"""A multi-hop trunk: three span servers relayed by the device give the monolithic tokens.

Servers run in this process on loopback (the tiny model's 8 layers: head 0:1, spans 1:3, 3:5,
5:7, tail 7:8). Servers of one mode and span share one loaded trunk, like replicas; each test
stops what it starts. Faults are injected at a chosen step (tests.test_failover's Tripwire).
"""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from lambda_split import (
    Checkpoint,
    FailoverEvent,
    FailoverPolicy,
    GenerationConfig,
    GenerationResult,
    TrunkService,
    encode_prompts,
    load_llm_service,
)
from lambda_split._chain import ChainClient, ChainMismatch, check_chain
from server import BackgroundServer, ServerConfig
from tests.conftest import monolithic
from tests.helpers import local_client, reference_tokens
from tests.secure_channel.conftest import PKI
from tests.server.conftest import MODES, LiveServer
from tests.test_failover import Faults, factory, stopping

PROMPT = "The quick brown fox"
GREEDY = GenerationConfig(max_new_tokens=12, stop_on_eos=False)
FAST = FailoverPolicy(attempts=3, deadline_s=20.0, backoff_s=0.01, max_backoff_s=0.05)
SPANS = ("1:3", "3:5", "5:7")

Services = dict[tuple[str, str], tuple[TrunkService, dict[str, Any]]]


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> PKI:
    return PKI.create(tmp_path_factory.mktemp("chain-pki"))


@pytest.fixture(scope="module")
def loaded() -> Services:
    return {}


@pytest.fixture
def servers(tiny: Checkpoint, pki: PKI, loaded: Services) -> Iterator[Callable[..., LiveServer]]:
    started: list[LiveServer] = []

    def start(span: str, mode: str = "plain", model: Checkpoint | None = None) -> LiveServer:
        checkpoint = model or tiny
        key = (f"{'tiny' if checkpoint is tiny else 'other'}/{mode}", span)
        if key not in loaded:
            loaded[key] = load_llm_service(checkpoint, span, security=mode)
        config = ServerConfig(model=checkpoint.name, split=span, security=mode, keys=str(pki.root), port=0)
        running = BackgroundServer(config, loaded[key])
        started.append(LiveServer(mode, running.url, pki.root, loaded[key][0], running))
        return started[-1]

    yield start
    for server in started:
        server.stop()


def run(client: ChainClient) -> GenerationResult:
    ids, mask = encode_prompts(client.tokenizer, [PROMPT], chat=True)
    return client.generate_ids(ids, mask, GREEDY, keep_logits=True)


@pytest.fixture(scope="module")
def monolithic_tokens(tiny: Checkpoint) -> list[int]:
    ids, mask = encode_prompts(tiny.tokenizer, [PROMPT], chat=True)
    return reference_tokens(monolithic(tiny), ids, mask, GREEDY.max_new_tokens, None)[0]


@pytest.fixture(scope="module")
def one_hop(tiny: Checkpoint) -> GenerationResult:
    """The same trunk 1:7 as one local session: the logits a chain must reproduce."""
    client, _ = local_client(tiny, "1:7")
    ids, mask = encode_prompts(client.tokenizer, [PROMPT], chat=True)
    return client.generate_ids(ids, mask, GREEDY, keep_logits=True)


def same_logits(result: GenerationResult, reference: GenerationResult) -> bool:
    return len(result.logits) == len(reference.logits) and all(
        float((ours - theirs).abs().max()) < 1e-4
        for ours, theirs in zip(result.logits, reference.logits, strict=True)
    )


def connect(
    hops: list[Any], tiny: Checkpoint, mode: str = "plain", keys: Path | None = None, **options: Any
) -> ChainClient:
    return ChainClient.connect(hops, security=mode, keys=keys, model=tiny, timeout=30, **options)  # type: ignore[arg-type]


@pytest.mark.parametrize("mode", MODES)
def test_three_spans_give_the_monolithic_tokens(
    servers: Callable[..., LiveServer],
    tiny: Checkpoint,
    pki: PKI,
    mode: str,
    monolithic_tokens: list[int],
    one_hop: GenerationResult,
) -> None:
    hops = [servers(span, mode).url for span in SPANS]
    with connect(hops, tiny, mode, pki.root) as client:
        result = run(client)
        assert client.split == (1, 7) and [hop.info.split for hop in client.hops] == [(1, 3), (3, 5), (5, 7)]
        assert all(hop.transport.security == mode for hop in client.hops)
        per_hop = [hop.wire_stats.bytes_sent for hop in client.hops]
        assert all(sent > 0 for sent in per_hop) and client.wire_stats.bytes_sent == sum(per_hop)
    assert result.token_ids[0] == monolithic_tokens
    assert same_logits(result, one_hop)


def test_http_links_and_a_lossy_wire_also_chain(
    servers: Callable[..., LiveServer],
    tiny: Checkpoint,
    monolithic_tokens: list[int],
    one_hop: GenerationResult,
) -> None:
    hops = [servers(span).url for span in SPANS]
    with connect(hops, tiny, transport_kind="http", failover=None) as client:
        result = run(client)
    assert result.token_ids[0] == monolithic_tokens and same_logits(result, one_hop)
    with connect(hops, tiny, wire="fp16") as client:
        assert len(run(client).token_ids[0]) == GREEDY.max_new_tokens


@pytest.mark.parametrize(
    ("spans", "problem"),
    [(("1:3", "4:7"), "gap between hop 1 .* and hop 2"), (("1:4", "3:7"), "overlap between hop 1")],
)
def test_a_gap_or_an_overlap_is_refused(
    servers: Callable[..., LiveServer], tiny: Checkpoint, spans: tuple[str, ...], problem: str
) -> None:
    hops = [servers(span).url for span in spans]
    with pytest.raises(ChainMismatch, match=problem):
        connect(hops, tiny)


def test_another_model_on_one_span_is_refused(servers: Callable[..., LiveServer], tiny: Checkpoint) -> None:
    hops = [servers("1:3").url, servers("3:5", model=_other_weights(tiny)).url, servers("5:7").url]
    with pytest.raises(ChainMismatch, match=r"span 3:5 .* fingerprint"):
        connect(hops, tiny)


def test_a_plan_span_the_server_does_not_serve_is_refused(
    servers: Callable[..., LiveServer], tiny: Checkpoint
) -> None:
    hops = [servers(span).url for span in SPANS]
    with pytest.raises(ChainMismatch, match="the plan says 3:6"):
        connect(hops, tiny, spans=["1:3", "3:6", "6:7"])


def test_check_chain_refuses_what_is_not_one_trunk() -> None:
    assert (check_chain([(1, 3), (3, 7)], 8).start, check_chain([(1, 3), (3, 7)], 8).stop) == (1, 7)
    for spans in ([], [(1, 3), (2, 7)], [(1, 3), (5, 7)], [(2, 2)], [(0, 3)]):
        with pytest.raises(ChainMismatch):
            check_chain(spans, 8)


@pytest.mark.parametrize("transport_kind", ["http", "stream"])
def test_killing_the_middle_span_fails_over_that_hop_only(
    servers: Callable[..., LiveServer],
    tiny: Checkpoint,
    monolithic_tokens: list[int],
    one_hop: GenerationResult,
    transport_kind: str,
) -> None:
    first, middle, spare, last = servers("1:3"), servers("3:5"), servers("3:5"), servers("5:7")
    faults, events = Faults(), list[tuple[int, FailoverEvent]]()
    # Steps are counted over every hop: step 3k+2 is the middle hop's (k+1)th; kill it at its 5th.
    faults.hooks[3 * 4 + 2] = stopping(middle)
    hops = [[first.url], [middle.url, spare.url], [last.url]]
    with connect(
        hops,
        tiny,
        failover=FAST,
        transport_factory=factory(faults),
        transport_kind=transport_kind,
        on_failover=lambda index, event: events.append((index, event)),
    ) as client:
        result = run(client)
        assert [hop.failovers for hop in client.hops] == [0, 1, 0]
        assert client.hops[1].url == spare.url and client.hops[0].url == first.url
    assert result.token_ids[0] == monolithic_tokens
    assert same_logits(result, one_hop)
    assert [(index, event.stage) for index, event in events] == [(1, "lost"), (1, "recovered")]
    # Only the middle hop reconnected: one connection per hop, plus the spare.
    assert faults.connects == [first.url, middle.url, last.url, spare.url]


def _other_weights(tiny: Checkpoint) -> Checkpoint:
    """The tiny model's name and shape with other weights: its spans have other fingerprints."""

    def read_tensors(names: Any) -> dict[str, torch.Tensor]:
        return {name: value + 0.5 for name, value in tiny.read_tensors(names).items()}

    def raw_tensor_bytes(name: str) -> bytes:
        return bytes((tiny.read_tensors([name])[name] + 0.5).numpy().tobytes())

    return dataclasses.replace(tiny, read_tensors=read_tensors, raw_tensor_bytes=raw_tensor_bytes)


# --- the command line ----------------------------------------------------------------------------


def cli(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    from lambda_split.cli import main

    code = main(argv)
    out, err = capsys.readouterr()
    return code, out, err


def test_generate_over_hops_prints_each_hop(
    servers: Callable[..., LiveServer], capsys: pytest.CaptureFixture[str], monolithic_tokens: list[int]
) -> None:
    first, middle, spare, last = servers("1:3"), servers("3:5"), servers("3:5"), servers("5:7")
    base = ["generate", "--security", "plain", "--model", "tiny-random-llama", "--json"]
    hops = ["--hop", first.url, "--hop", f"{middle.url},{spare.url}", "--hop", last.url]
    code, out, _ = cli([*base, *hops, "--max-new-tokens", "12", "--temperature", "0", PROMPT], capsys)
    assert code == 0
    data = json.loads(out)
    assert data["split"] == [1, 7] and data["security"] == "plain"
    assert [hop["split"] for hop in data["stats"]["hops"]] == [[1, 3], [3, 5], [5, 7]]
    assert data["stats"]["bytes_sent"] == sum(hop["bytes_sent"] for hop in data["stats"]["hops"])
    code, _, err = cli([*base, "--hop", first.url, "--hop", last.url, PROMPT], capsys)
    assert code == 4 and "gap between hop 1" in err and "Traceback" not in err
    code, _, err = cli([*base, "--server", first.url, "--hop", last.url, PROMPT], capsys)
    assert code == 2 and "not both" in err
    code, _, err = cli([*base, "--hop", first.url, "--hop", first.url, PROMPT], capsys)
    assert code == 2 and "given twice" in err
    code, _, err = cli([*base, PROMPT], capsys)
    assert code == 2 and "give --server" in err
    for option in (
        ["--receipts"],
        ["--verify-rate", "1"],
        ["--transcript", "t.jsonl"],
    ):  # not silently ignored
        code, _, err = cli([*base, "--hop", first.url, "--hop", last.url, *option, PROMPT], capsys)
        assert code == 2 and "not supported with --hop" in err


def test_plan_then_generate_with_the_plan(
    servers: Callable[..., LiveServer], capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    """Plan for three servers (one twice as fast), start them at the planned spans, generate --plan."""
    megabyte = 2**20
    servers_file = tmp_path / "servers.json"
    fleet = [
        {"name": "a", "url": "http://127.0.0.1:1", "memory_mb": 64, "layer_ms": 3.0, "rtt_ms": 0.5},
        {"name": "b", "url": "http://127.0.0.1:2", "memory_mb": 64, "layer_ms": 1.0, "rtt_ms": 0.5},
        {"name": "c", "url": "http://127.0.0.1:3", "memory_mb": 64, "layer_ms": 3.0, "rtt_ms": 0.5},
    ]
    servers_file.write_text(json.dumps({"servers": fleet}))
    plan_file = tmp_path / "plan.json"
    argv = ["plan", "--model", "tiny-random-llama", "--servers", str(servers_file), "--split", "1:7"]
    code, out, _ = cli([*argv, "--out", str(plan_file), "--json"], capsys)
    assert code == 0
    plan = json.loads(out)
    assert plan == json.loads(plan_file.read_text())
    # 6 layers at 3, 1 and 3 ms a layer: 1, 4 and 1 layers (4 ms); equal memory gives 2 each (6 ms).
    assert [hop["split"] for hop in plan["hops"]] == [[1, 2], [2, 6], [6, 7]]
    assert plan["bottleneck_s"] == pytest.approx(0.004)
    assert plan["memory_proportional"]["bottleneck_s"] == pytest.approx(0.006)
    assert all(hop["memory_bytes"] <= 64 * megabyte for hop in plan["hops"])
    for hop in plan["hops"]:
        hop["urls"] = [servers(f"{hop['split'][0]}:{hop['split'][1]}").url]
    plan_file.write_text(json.dumps(plan))
    base = [
        "generate",
        "--security",
        "plain",
        "--model",
        "tiny-random-llama",
        "--json",
        "--max-new-tokens",
        "4",
    ]
    code, out, _ = cli([*base, "--plan", str(plan_file), PROMPT], capsys)
    assert code == 0 and json.loads(out)["split"] == [1, 7]
    code, _, err = cli([*base, "--plan", str(servers_file), PROMPT], capsys)
    assert code == 2 and "not a plan file" in err
    servers_file.write_text(json.dumps({"servers": [{**s, "memory_mb": 0.001} for s in fleet]}))
    code, _, err = cli([*argv], capsys)
    assert code == 2 and "cannot hold it" in err


def test_plan_probes_servers_that_give_no_figures(
    servers: Callable[..., LiveServer], capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    urls = [servers(span).url for span in SPANS]
    fleet = [{"name": f"s{k}", "url": url, "memory_mb": 64} for k, url in enumerate(urls)]
    servers_file = tmp_path / "servers.json"
    servers_file.write_text(json.dumps({"servers": fleet}))
    argv = [
        "plan",
        "--model",
        "tiny-random-llama",
        "--servers",
        str(servers_file),
        "--split",
        "1:7",
        "--json",
    ]
    code, _, err = cli(argv, capsys)
    assert code == 2 and "no layer_ms for s0, s1, s2" in err
    code, out, err = cli([*argv, "--probe", "--security", "plain"], capsys)
    assert code == 0, err
    plan = json.loads(out)
    assert sum(hop["split"][1] - hop["split"][0] for hop in plan["hops"]) == 6
    assert all(hop["stage_s"] > 0 and hop["rtt_s"] > 0 for hop in plan["hops"])
    assert "s0: span 1:3" in err and "ms per layer" in err


# --- kill -9 of a span: lambda-split serve in subprocesses ---------------------------------------


class SpanProcess:
    """``lambda-split serve --split SPAN`` of tiny-random-llama in plain mode, in a subprocess."""

    def __init__(self, span: str) -> None:
        command = [
            sys.executable,
            "-m",
            "lambda_split",
            "serve",
            "--model",
            "tiny-random-llama",
            "--split",
            span,
        ]
        command += ["--security", "plain", "--port", "0"]
        self.process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        self.url = ""

    def wait(self) -> SpanProcess:
        guard = threading.Timer(600, self.process.kill)  # a loaded machine starts slowly
        guard.start()
        try:
            assert self.process.stdout is not None
            line = self.process.stdout.readline()
        finally:
            guard.cancel()
        assert line.startswith("listening on "), f"lambda-split serve did not start: {line!r}"
        self.url = line.removeprefix("listening on ").strip()
        return self

    def kill(self) -> None:
        self.process.kill()
        self.process.wait(30)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.kill()
        if self.process.stdout is not None:
            self.process.stdout.close()


# Four server processes: the hop's failover runs on every run in this process over both links
# (test_killing_the_middle_span_fails_over_that_hop_only), and a SIGKILLed serve process is replayed
# on every run in tests/test_failover.py (test_kill_9_mid_generation_costs_one_replay_and_no_token).
@pytest.mark.exhaustive
def test_kill_9_of_the_middle_span_costs_one_replay_on_that_hop(
    tiny: Checkpoint, monolithic_tokens: list[int], one_hop: GenerationResult
) -> None:
    started = [SpanProcess(span) for span in ("1:3", "3:5", "3:5", "5:7")]
    try:
        first, middle, spare, last = (span.wait() for span in started)
        faults = Faults(hooks={3 * 4 + 2: middle.kill})  # the middle hop's 5th step
        hops = [[first.url], [middle.url, spare.url], [last.url]]
        with connect(hops, tiny, failover=FAST, transport_factory=factory(faults)) as client:
            result = run(client)
            assert [hop.failovers for hop in client.hops] == [0, 1, 0]
        assert result.token_ids[0] == monolithic_tokens and same_logits(result, one_hop)
        assert middle.process.returncode == -9
    finally:
        for span in started:
            span.stop()
