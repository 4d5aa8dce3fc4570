"""The persistent stream (the client's default): in every mode, with the HTTP path's exact results."""

from __future__ import annotations

import json
from collections.abc import Callable

import pytest
import torch

from lambda_split import (
    Checkpoint,
    GenerationConfig,
    HTTPLink,
    SplitClient,
    StreamLink,
    encode_prompts,
)
from lambda_split.protocol import (
    ROUTE_HEADER,
    STREAM_PATH,
    Encoding,
    FrameKind,
    StreamOp,
    decode_frame,
    encode_frame,
    llm_step_tensors,
)
from secure_channel import connect_transport
from tests.conftest import monolithic
from tests.helpers import reference_tokens
from tests.server.conftest import MODES, LiveServer, wait_for

GREEDY = GenerationConfig(max_new_tokens=24)
#: The issue's budget: bytes per decode step and direction beyond the trunk's own frame.
MAX_FRAMING = 64


def connect(server: LiveServer, model: Checkpoint, kind: str, wire: str = "fp32") -> SplitClient:
    keys = None if server.mode == "plain" else server.keys
    return SplitClient.connect(
        server.url,
        security=server.mode,  # type: ignore[arg-type]
        keys=keys,
        model=model,
        wire=wire,
        transport_kind=kind,  # type: ignore[arg-type]
    )


@pytest.mark.parametrize("mode", MODES)
def test_the_stream_gives_the_monolithic_and_the_http_tokens(
    live: dict[str, LiveServer], tiny: Checkpoint, mode: str
) -> None:
    tokens = {}
    for kind, link in (("stream", StreamLink), ("http", HTTPLink)):
        with connect(live[mode], tiny, kind) as client:
            assert isinstance(client.link, link)
            ids, mask = encode_prompts(client.tokenizer, ["hello there", "x"], chat=True)
            tokens[kind] = client.generate_ids(ids, mask, GREEDY).token_ids
            # a second generation reuses the client's stream
            assert client.generate_ids(ids, mask, GREEDY).token_ids == tokens[kind]
    expected = reference_tokens(monolithic(tiny), ids, mask, 24, client.tokenizer.eos_token_id)
    assert tokens["stream"] == tokens["http"] == expected


@pytest.mark.parametrize("mode", MODES)
def test_the_stream_is_the_default_in_every_mode_and_changes_nothing_but_the_framing(
    live: dict[str, LiveServer], tiny: Checkpoint, mode: str
) -> None:
    """Now that the eavesdropping suite captures and polices the stream (SECURITY.md, "Streams")."""
    server = live[mode]
    keys = None if mode == "plain" else server.keys
    with SplitClient.connect(server.url, security=mode, keys=keys, model=tiny) as client:  # type: ignore[arg-type]
        assert isinstance(client.link, StreamLink) and client.link.transport is client.transport
        assert client.transport.security == mode
        client.generate("hi", GenerationConfig(max_new_tokens=2))
    with connect(server, tiny, "http") as client:
        assert isinstance(client.link, HTTPLink) and client.transport.security == mode


def _framing(mode: str, server: LiveServer, hidden_size: int, wire: Encoding) -> tuple[int, int]:
    """Socket bytes of one decode step, each direction, minus the trunk frame it carries."""
    transport = connect_transport(server.url, mode, keys_dir=None if mode == "plain" else server.keys)  # type: ignore[arg-type]
    stream = transport.open_stream(STREAM_PATH, {ROUTE_HEADER: "0" * 32})
    try:
        stream.send(bytes((StreamOp.OPEN,)) + json.dumps({"wire": wire.wire_name}).encode())
        session = bytes.fromhex(json.loads(stream.recv()[1:])["session_id"])
        sent, received, replies = 0, 0, []
        for seq in range(3):  # a prefill of one token, then two decode steps
            frame = encode_frame(
                FrameKind.LLM_STEP,
                session,
                seq,
                {
                    "hidden": (torch.randn(1, 1, hidden_size), wire),
                    "mask": (torch.ones(1, 1, dtype=torch.uint8), Encoding.U8),
                },
            )
            before = (transport.stats.bytes_sent, transport.stats.bytes_received)
            stream.send(bytes((StreamOp.STEP,)) + frame)
            reply = stream.recv()
            assert reply[0] == StreamOp.STEP
            sent = transport.stats.bytes_sent - before[0] - len(frame)
            received = transport.stats.bytes_received - before[1] - (len(reply) - 1)
            replies.append((sent, received))
        assert replies[1] == replies[2]  # deterministic: the same bytes every step
        return sent, received
    finally:
        stream.close()
        transport.close()


@pytest.mark.parametrize("mode", MODES)
def test_framing_per_decode_step_is_small(live: dict[str, LiveServer], tiny: Checkpoint, mode: str) -> None:
    """Counted at the socket: WebSocket header, op byte, record header and tag, TLS record."""
    sent, received = _framing(mode, live[mode], tiny.config.hidden_size, Encoding.FP16)
    assert sent <= MAX_FRAMING and received <= MAX_FRAMING, (sent, received)
    # what each layer adds: ws 8 (client, masked) or 4 (server) + op 1, record 1 + 16 (the epoch's
    # low byte and the tag: secure_channel._sealed_stream), TLS 5 + 1 + 16
    ws = (8 + 1, 4 + 1)
    record = 17 if "aesgcm" in mode else 0
    tls = 22 if mode.startswith("tls") else 0
    assert (sent, received) == (ws[0] + record + tls, ws[1] + record + tls)


def test_the_issues_budget_holds_for_a_smollm2_decode_step_in_tls_aesgcm(live: dict[str, LiveServer]) -> None:
    """Issue 13: everything but the tensor payload, per decode step and direction, at most 64 bytes
    in ``tls+aesgcm``. The stream's framing is measured at the socket; the frames are the ones the
    client and server build for SmolLM2 (hidden 576, fp16: 1,152 payload bytes)."""
    sent, received = _framing("tls+aesgcm", live["tls+aesgcm"], 64, Encoding.FP16)
    hidden, ones = torch.randn(1, 1, 576), torch.ones(1, 1, dtype=torch.uint8)
    step = encode_frame(FrameKind.LLM_STEP, None, 100, llm_step_tensors(hidden, ones, Encoding.FP16))
    result = encode_frame(FrameKind.LLM_RESULT, None, 100, {"hidden": (hidden, Encoding.FP16)})
    payload = 2 * 576
    up = sent + 1 + len(step) - payload  # BOUND_STEP: the handle byte after the op
    down = received + len(result) - payload
    assert up <= MAX_FRAMING and down <= MAX_FRAMING, (up, down)
    assert (up, down) == (48 + 1 + 12, 44 + 12)  # frame header 5 and tensor header 7 each way


def test_a_stream_the_server_closed_while_idle_is_reopened_for_the_next_session(
    make_server: Callable[..., LiveServer], tiny: Checkpoint
) -> None:
    import httpx

    server = make_server("plain", idle_timeout_s=1.0)
    with connect(server, tiny, "stream") as client:
        first = client.generate("hello", GREEDY).token_ids
        gauge = lambda: httpx.get(server.url + "/metrics").text  # noqa: E731
        assert wait_for(lambda: "lambda_split_open_streams 0.0" in gauge())  # closed at the idle deadline
        assert client.generate("hello", GREEDY).token_ids == first


def test_a_bound_step_names_its_session_by_handle_and_drops_the_id_and_the_all_ones_mask(
    live: dict[str, LiveServer], tiny: Checkpoint
) -> None:
    """The client's decode step: op, handle, then a frame with neither session id nor mask."""
    transport = connect_transport(live["plain"].url, "plain")
    stream = transport.open_stream(STREAM_PATH, {ROUTE_HEADER: "0" * 32})

    def ask(message: bytes) -> bytes:
        stream.send(message)
        return stream.recv()

    try:
        opened = [json.loads(ask(bytes((StreamOp.OPEN,)) + b'{"wire": "fp16"}')[1:]) for _ in range(2)]
        assert [o["handle"] for o in opened] == [1, 2]
        hidden, ones = torch.randn(1, 1, tiny.config.hidden_size), torch.ones(1, 1, dtype=torch.uint8)
        bare = encode_frame(FrameKind.LLM_STEP, None, 0, llm_step_tensors(hidden, ones, Encoding.FP16))
        masked = encode_frame(
            FrameKind.LLM_STEP, None, 0, {"hidden": (hidden, Encoding.FP16), "mask": (ones, Encoding.U8)}
        )
        assert (
            len(masked) - len(bare) == 1 + 1 + 1 + 2 + 1
        )  # the mask tensor the decode step saves (a table name)
        before = (transport.stats.bytes_sent, transport.stats.bytes_received)
        first = ask(bytes((StreamOp.BOUND_STEP, 1)) + bare)
        # a client WebSocket header of 8 bytes (masked, 16-bit length), the op and the handle
        assert transport.stats.bytes_sent - before[0] == 8 + 2 + len(bare)
        assert transport.stats.bytes_received - before[1] == 4 + len(first)
        second = ask(bytes((StreamOp.BOUND_STEP, 2)) + masked)
        assert first[0] == StreamOp.BOUND_STEP and first == second  # an absent mask is all ones
        result = decode_frame(first[1:])
        assert result.session_id is None and result.seq == 0
        for message, status, code in (
            (bytes((StreamOp.BOUND_STEP, 3)) + bare, 404, "session_not_found"),
            (bytes((StreamOp.BOUND_STEP,)), 404, "session_not_found"),
            (bytes((StreamOp.STEP,)) + bare, 400, "bad_frame"),  # a STEP frame must name its session
        ):
            error = ask(message)
            assert error[0] == StreamOp.ERROR
            assert (json.loads(error[1:])["status"], json.loads(error[1:])["error"]["code"]) == (status, code)
    finally:
        stream.close()
        transport.close()
