"""A hostile client against a running trunk server: every abuse gets the right 4xx/5xx,
the server stays up, and an honest client's output stays correct.

Fuzzed frames are drawn within the fuzzed server's frame limits, so ``encode_frame`` never
refuses one; frames over a limit are explicit tests of their own. Every session a test opens is
closed in ``finally``, and the ``http`` fixture checks that the server holds none afterwards.
Nothing here waits on a clock: rate limits refill too slowly to matter and idle expiry runs
on a clock the test moves.
"""

from __future__ import annotations

import contextlib
import json
import math
import socket
from collections.abc import Callable, Iterator
from urllib.parse import urlsplit

import httpx
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lambda_split import Checkpoint, GenerationConfig, RemoteTrunk, SplitClient, TrunkService
from lambda_split._codec import FrameLimits
from lambda_split.protocol import FRAME_CONTENT_TYPE, Encoding, FrameKind, encode_frame
from server import ServerConfig
from tests.helpers import varint
from tests.secure_channel.conftest import PKI
from tests.server.conftest import LiveServer, start_server, wait_for

ERROR_STATUSES = {400, 404, 405, 408, 409, 413, 415, 422, 429, 503}
FUZZ_BODY_BYTES = 256 * 1024  # the fuzzed server's body and frame limit: small, so fuzzing stays fast
FUZZ_LIMITS = ServerConfig(max_body_bytes=FUZZ_BODY_BYTES).service_limits().frame
FUZZ_ENCODINGS = list(Encoding)[:4]  # fp32, fp16, bf16, int8
#: header (4), session id (16), sequence number 0 (a 1-byte varint), name ("hidden" is one byte of the
#: static table), encoding and rank: then the dims
HIDDEN_OFFSET = 4 + 16 + 1 + 1 + 2


def frame_overhead(limits: FrameLimits) -> int:
    """Header bytes of a frame with as many tensors of as high a rank as ``limits`` allow."""
    return (
        4 + 16 + 10 + limits.max_tensors * (1 + 32 + 2 + 5 * limits.max_rank)
    )  # varints: 10 and 5 bytes at most


def element_budget(limits: FrameLimits) -> int:
    """Elements a fuzzed ``hidden`` may have so that it and its U8 mask fit ``limits`` in any encoding.

    Per element: at most 5 bytes of ``hidden`` (fp32 is 4; int8 is 1 plus a 4-byte scale per
    block of 64, so 5 for a lone element) and at most 1 byte of mask.
    """
    return min(limits.max_elements, (limits.max_bytes - frame_overhead(limits)) // 6)


def fitting_shapes(limits: FrameLimits) -> st.SearchStrategy[list[int]]:
    """Shapes whose frame ``encode_frame(..., limits)`` always accepts, of every rank it allows."""
    budget = element_budget(limits)

    @st.composite
    def shapes(draw: st.DrawFn) -> list[int]:
        rank = draw(st.integers(1, limits.max_rank))
        side = math.floor(budget ** (1 / rank))
        while side**rank > budget:  # floating-point roots can overshoot by one
            side -= 1
        return draw(st.lists(st.integers(1, side), min_size=rank, max_size=rank))

    return shapes()


def is_json_error(response: httpx.Response) -> bool:
    body = response.json()
    return (
        set(body) == {"error"}
        and set(body["error"]) == {"code", "message"}
        and "Traceback" not in response.text
    )


def honest_output(server: LiveServer, tiny: Checkpoint) -> list[int]:
    with SplitClient.connect(server.url, security="plain", model=tiny) as client:
        return client.generate("hello", GenerationConfig(max_new_tokens=8)).token_ids[0]


@contextlib.contextmanager
def opened_session(http: httpx.Client) -> Iterator[str]:
    reply = http.post("/v1/sessions", json={"wire": "fp32"})
    assert reply.status_code == 201, reply.text
    sid = str(reply.json()["session_id"])
    try:
        yield sid
    finally:
        http.delete(f"/v1/sessions/{sid}")


def assert_no_sessions(service: TrunkService) -> None:
    if service.open_sessions:
        raise AssertionError(f"{service.open_sessions} session(s) leaked")


def raw_request(url: str, head: bytes, chunks: list[bytes]) -> bytes:
    parts = urlsplit(url)
    with socket.create_connection((parts.hostname, parts.port), timeout=30) as sock:
        sock.sendall(head)
        for chunk in chunks:
            try:
                sock.sendall(chunk)
            except OSError:
                break
        return sock.recv(65536)


def small_frame(sid: str, shape: tuple[int, ...] = (1, 1, 64)) -> bytes:
    hidden = torch.zeros(*shape)
    mask = torch.ones(*shape[:2], dtype=torch.uint8)
    return encode_frame(
        FrameKind.LLM_STEP,
        bytes.fromhex(sid),
        0,
        {"hidden": (hidden, Encoding.FP32), "mask": (mask, Encoding.U8)},
    )


@pytest.fixture(scope="module")
def target(tiny: Checkpoint, server_pki: PKI) -> Iterator[LiveServer]:
    server = start_server(tiny, "plain", server_pki.root, max_body_bytes=FUZZ_BODY_BYTES, max_step_tokens=64)
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def http(target: LiveServer) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=target.url, timeout=30) as client:
        yield client
    assert_no_sessions(target.service)


def test_the_leak_check_sees_a_leaked_session(target: LiveServer) -> None:
    with (
        httpx.Client(base_url=target.url, timeout=30) as client,
        opened_session(client),
        pytest.raises(AssertionError, match="1 session"),
    ):
        assert_no_sessions(target.service)
    assert_no_sessions(target.service)


@pytest.mark.parametrize("encoding", FUZZ_ENCODINGS)
def test_the_largest_fuzzed_shapes_encode_within_the_limits(encoding: Encoding) -> None:
    budget = element_budget(FUZZ_LIMITS)
    for rank in range(1, FUZZ_LIMITS.max_rank + 1):
        side = math.floor(budget ** (1 / rank))
        while side**rank > budget:
            side -= 1
        shape = [side] * rank
        tensors = {
            "hidden": (torch.ones(*shape), encoding),
            "mask": (torch.ones(*shape[:2], dtype=torch.uint8), Encoding.U8),
        }
        assert (
            len(encode_frame(FrameKind.LLM_STEP, bytes(16), 0, tensors, FUZZ_LIMITS)) <= FUZZ_LIMITS.max_bytes
        )


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(body=st.binary(max_size=2048), content_type=st.sampled_from([FRAME_CONTENT_TYPE, "text/plain", ""]))
def test_fuzzed_step_bodies_are_refused_cleanly(http: httpx.Client, body: bytes, content_type: str) -> None:
    with opened_session(http) as sid:
        reply = http.post(f"/v1/sessions/{sid}/step", content=body, headers={"content-type": content_type})
    assert reply.status_code in ERROR_STATUSES and is_json_error(reply)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.data())
def test_fuzzed_well_formed_frames_with_bad_contents(http: httpx.Client, data: st.DataObject) -> None:
    shape = data.draw(fitting_shapes(FUZZ_LIMITS))
    tensors = {"hidden": (torch.randn(*shape), data.draw(st.sampled_from(FUZZ_ENCODINGS)))}
    if data.draw(st.booleans()):
        tensors["mask"] = (torch.ones(*shape[:2], dtype=torch.uint8), Encoding.U8)
    kind = data.draw(st.sampled_from(list(FrameKind)))
    seq = data.draw(st.sampled_from([0, 1, 2**40]))
    with opened_session(http) as sid:
        frame = encode_frame(kind, bytes.fromhex(sid), seq, tensors, FUZZ_LIMITS)
        reply = http.post(
            f"/v1/sessions/{sid}/step", content=frame, headers={"content-type": FRAME_CONTENT_TYPE}
        )
    assert reply.status_code in ERROR_STATUSES | {200}
    if reply.status_code != 200:
        assert is_json_error(reply)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    st.one_of(
        st.binary(max_size=256),
        st.recursive(
            st.none() | st.booleans() | st.floats() | st.text(),
            lambda inner: st.lists(inner) | st.dictionaries(st.text(), inner),
        ).map(lambda v: json.dumps(v).encode()),
    )
)
def test_fuzzed_session_json(http: httpx.Client, body: bytes) -> None:
    reply = http.post("/v1/sessions", content=body, headers={"content-type": "application/json"})
    assert reply.status_code in {201, 400}
    if reply.status_code == 201:
        http.delete(f"/v1/sessions/{reply.json()['session_id']}")
    else:
        assert is_json_error(reply)


def test_a_frame_over_the_byte_limit_gets_413(http: httpx.Client) -> None:
    over = math.ceil(FUZZ_LIMITS.max_bytes / 4) + 1  # fp32 elements: more bytes than the limit
    big = FrameLimits(max_bytes=FUZZ_LIMITS.max_bytes * 2)
    with opened_session(http) as sid:
        tensors = {
            "hidden": (torch.zeros(1, over, 1), Encoding.FP32),
            "mask": (torch.ones(1, over, dtype=torch.uint8), Encoding.U8),
        }
        with pytest.raises(ValueError, match="byte limit"):
            encode_frame(FrameKind.LLM_STEP, bytes.fromhex(sid), 0, tensors, FUZZ_LIMITS)
        frame = encode_frame(FrameKind.LLM_STEP, bytes.fromhex(sid), 0, tensors, big)
        reply = http.post(
            f"/v1/sessions/{sid}/step", content=frame, headers={"content-type": FRAME_CONTENT_TYPE}
        )
    assert reply.status_code == 413 and is_json_error(reply)
    assert f"{FUZZ_LIMITS.max_bytes:,}" in reply.json()["error"]["message"]


def test_a_frame_claiming_too_many_elements_is_refused_before_allocation(http: httpx.Client) -> None:
    side = math.isqrt(FUZZ_LIMITS.max_elements) + 1  # side * side > max_elements
    with opened_session(http) as sid:
        frame = bytearray(small_frame(sid))
        assert frame[HIDDEN_OFFSET : HIDDEN_OFFSET + 3] == bytes((1, 1, 64))  # the dims, 1-byte varints
        frame[HIDDEN_OFFSET : HIDDEN_OFFSET + 3] = varint(side) + varint(side) + varint(1)
        reply = http.post(
            f"/v1/sessions/{sid}/step", content=bytes(frame), headers={"content-type": FRAME_CONTENT_TYPE}
        )
    assert reply.status_code == 400 and reply.json()["error"]["code"] == "bad_frame"
    assert f"more than {FUZZ_LIMITS.max_elements} elements" in reply.json()["error"]["message"]


def test_a_step_over_the_token_limit_gets_413_in_tokens(http: httpx.Client, target: LiveServer) -> None:
    limit = target.service.limits.max_step_tokens
    with opened_session(http) as sid:
        reply = http.post(
            f"/v1/sessions/{sid}/step",
            content=small_frame(sid, (1, limit + 1, 64)),
            headers={"content-type": FRAME_CONTENT_TYPE},
        )
    assert reply.status_code == 413 and reply.json()["error"]["code"] == "step_too_large"
    assert f"{limit} tokens" in reply.json()["error"]["message"]


def test_guessed_session_ids_are_not_found(http: httpx.Client) -> None:
    for guess in ("00" * 16, "ff" * 16, "not-hex", "a" * 64):
        reply = http.post(
            f"/v1/sessions/{guess}/step", content=b"x", headers={"content-type": FRAME_CONTENT_TYPE}
        )
        assert reply.status_code == 404 and reply.json()["error"]["code"] == "session_not_found"


def test_unknown_routes_and_methods_answer_json(http: httpx.Client) -> None:
    assert http.get("/nope").status_code == 404 and is_json_error(http.get("/nope"))
    assert http.get("/v1/sessions").status_code == 405 and is_json_error(http.get("/v1/sessions"))


def test_response_headers_are_hardened(http: httpx.Client) -> None:
    reply = http.get("/v1/info")
    assert reply.headers["cache-control"] == "no-store"
    assert reply.headers["x-content-type-options"] == "nosniff"
    assert "server" not in reply.headers


def test_hardening_headers_are_sent_once_even_over_the_sealed_channel(
    make_server: Callable[..., LiveServer],
) -> None:
    server = make_server("aesgcm")  # the AES-GCM layer answers with its own cache-control
    with httpx.Client(base_url=server.url) as client:
        reply = client.post("/v1/handshake", content=b"junk")
    assert 400 <= reply.status_code < 500
    assert reply.headers.get_list("cache-control") == ["no-store"]
    assert reply.headers.get_list("x-content-type-options") == ["nosniff"]


def test_a_body_limit_above_the_unauthenticated_buffer_still_serves_sealed_requests(
    make_server: Callable[..., LiveServer],
) -> None:
    """The AES-GCM layer's cap on unauthenticated bytes grows with max_body_bytes; a layer that
    refused its settings would only have failed at the first request, after 'listening on'."""
    from secure_channel import Request, connect_transport

    server = make_server("aesgcm", max_body_bytes=300 * 1024 * 1024)
    with connect_transport(server.url, "aesgcm", keys_dir=server.keys) as transport:
        reply = transport.exchange(Request("GET", "/healthz"))
    assert reply.status == 200


def test_oversized_bodies_declared_or_chunked_get_413(make_server: Callable[..., LiveServer]) -> None:
    server = make_server(max_body_bytes=4096)
    head = f"POST /v1/sessions HTTP/1.1\r\nHost: x\r\nContent-Length: {10**6}\r\n\r\n".encode()
    assert b" 413 " in raw_request(server.url, head, [])
    chunked = b"POST /v1/sessions HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
    chunk = b"%x\r\n%s\r\n" % (30_000, b"a" * 30_000)
    assert b" 413 " in raw_request(server.url, chunked, [chunk, chunk, chunk, b"0\r\n\r\n"])


def test_slow_sender_gets_408(make_server: Callable[..., LiveServer]) -> None:
    server = make_server(receive_timeout_s=0.5)
    head = b"POST /v1/sessions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 40\r\n\r\n"
    assert b" 408 " in raw_request(server.url, head, [b"{", b'"wire"'])  # 7 of 40 bytes: never completes


def test_floods_beyond_every_limit(make_server: Callable[..., LiveServer], tiny: Checkpoint) -> None:
    # 0.01 tokens/s: no request in this test can earn a refill, however slow the machine
    server = make_server(max_sessions=2, rate_limit_per_s=0.01, rate_limit_burst=6)
    with httpx.Client(base_url=server.url, timeout=30) as client:
        statuses = [client.post("/v1/sessions", json={}) for _ in range(3)]
        assert [r.status_code for r in statuses] == [201, 201, 503]
        assert statuses[2].headers["retry-after"] and is_json_error(statuses[2])
        flood = [client.get("/v1/info").status_code for _ in range(4)]
        assert flood == [200, 200, 200, 429]
        limited = client.get("/v1/info")
        assert limited.headers["retry-after"] and is_json_error(limited)
        assert client.get("/healthz").status_code == 200  # health checks are never rate limited


def test_concurrency_limit_answers_503(make_server: Callable[..., LiveServer]) -> None:
    server = make_server(max_concurrency=1, receive_timeout_s=300)
    parts = urlsplit(server.url)
    with socket.create_connection((parts.hostname, parts.port)) as hog:
        hog.sendall(
            b"POST /v1/sessions HTTP/1.1\r\nHost: x\r\nContent-Length: 10\r\n\r\n{"
        )  # holds the only slot
        replies: list[httpx.Response] = []
        assert wait_for(
            lambda: replies.append(httpx.get(server.url + "/v1/info")) or replies[-1].status_code == 503
        )
        assert replies[-1].headers["retry-after"] and is_json_error(replies[-1])


class SteppedClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_a_killed_client_leaves_no_session_after_expiry(
    make_server: Callable[..., LiveServer], tiny: Checkpoint
) -> None:
    server = make_server(idle_timeout_s=60, expiry_interval_s=0.05)
    clock = SteppedClock()
    server.service._clock = clock  # idle time passes when the test says so
    client = SplitClient.connect(server.url, security="plain", model=tiny)
    trunk = RemoteTrunk(client.transport, Encoding.FP32)
    trunk(torch.randn(1, 3, 64), torch.ones(1, 3))  # mid-generation, then the client vanishes
    client.transport.close()

    def metric(name: str) -> float:
        for line in httpx.get(server.url + "/metrics").text.splitlines():
            if line.startswith(name + " "):
                return float(line.split()[1])
        raise AssertionError(f"metric {name} missing")

    assert metric("lambda_split_open_sessions") == 1
    clock.now += 61
    assert wait_for(lambda: metric("lambda_split_open_sessions") == 0)
    assert metric("lambda_split_sessions_expired_total") == 1


def test_server_survived_and_honest_output_is_unchanged(
    target: LiveServer, tiny: Checkpoint, http: httpx.Client
) -> None:
    assert http.get("/healthz").json() == {"status": "ok"}
    from tests.helpers import local_client

    local, _ = local_client(tiny, "2:-2")
    assert (
        honest_output(target, tiny)
        == local.generate("hello", GenerationConfig(max_new_tokens=8)).token_ids[0]
    )


def test_handshake_floods_are_rate_limited_per_address(make_server: Callable[..., LiveServer]) -> None:
    server = make_server("aesgcm", handshake_rate_per_s=0.01, handshake_burst=3)
    with httpx.Client(base_url=server.url, timeout=30) as client:
        replies = [client.post("/v1/handshake", content=b"\x01\x01" + bytes(64)) for _ in range(6)]
    statuses = [r.status_code for r in replies]
    assert 429 not in statuses[:3] and statuses[3:] == [429] * 3
    assert replies[-1].headers["retry-after"] and is_json_error(replies[-1])


def test_a_sealed_frame_over_the_limit_gets_413_naming_the_frame_limit(
    make_server: Callable[..., LiveServer],
) -> None:
    from secure_channel import Request, connect_transport

    server = make_server("aesgcm", max_body_bytes=4096)
    with connect_transport(server.url, "aesgcm", keys_dir=server.keys) as transport:
        opened = transport.exchange(Request("POST", "/v1/sessions", b'{"wire": "fp32"}'))
        sid = json.loads(opened.content)["session_id"]
        try:
            frame = small_frame(
                sid, (1, 20, 64)
            )  # 5 KiB of hidden states: the record passes, the frame does not
            reply = transport.exchange(
                Request("POST", f"/v1/sessions/{sid}/step", frame, {"content-type": FRAME_CONTENT_TYPE})
            )
        finally:
            transport.exchange(Request("DELETE", f"/v1/sessions/{sid}"))
    error = json.loads(reply.content)["error"]
    assert reply.status == 413 and error["code"] == "frame_too_large" and "4,096 bytes" in error["message"]
    assert_no_sessions(server.service)
