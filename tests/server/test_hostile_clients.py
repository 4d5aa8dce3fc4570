"""A hostile client against a running trunk server: every abuse gets the right 4xx/5xx,
the server stays up, and an honest client's output stays correct."""

from __future__ import annotations

import json
import socket
import time
from collections.abc import Callable
from urllib.parse import urlsplit

import httpx
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lambda_split import Checkpoint, GenerationConfig, SplitClient
from lambda_split.protocol import FRAME_CONTENT_TYPE, Encoding, FrameKind, encode_frame
from tests.server.conftest import LiveServer, wait_for

ERROR_STATUSES = {400, 404, 405, 408, 409, 413, 415, 422, 429, 503}


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


def open_session(http: httpx.Client) -> str:
    reply = http.post("/v1/sessions", json={"wire": "fp32"})
    assert reply.status_code == 201
    return str(reply.json()["session_id"])


def raw_request(url: str, head: bytes, chunks: list[bytes], pause: float = 0.0) -> bytes:
    parts = urlsplit(url)
    with socket.create_connection((parts.hostname, parts.port), timeout=10) as sock:
        sock.sendall(head)
        for chunk in chunks:
            time.sleep(pause)
            try:
                sock.sendall(chunk)
            except OSError:
                break
        return sock.recv(65536)


@pytest.fixture(scope="module")
def target(live: dict[str, LiveServer]) -> LiveServer:
    return live["plain"]


@pytest.fixture(scope="module")
def http(target: LiveServer) -> httpx.Client:
    return httpx.Client(base_url=target.url, timeout=10)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(body=st.binary(max_size=2048), content_type=st.sampled_from([FRAME_CONTENT_TYPE, "text/plain", ""]))
def test_fuzzed_step_bodies_are_refused_cleanly(http: httpx.Client, body: bytes, content_type: str) -> None:
    sid = open_session(http)
    reply = http.post(f"/v1/sessions/{sid}/step", content=body, headers={"content-type": content_type})
    assert reply.status_code in ERROR_STATUSES and is_json_error(reply)
    http.delete(f"/v1/sessions/{sid}")


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.data())
def test_fuzzed_well_formed_frames_with_bad_contents(http: httpx.Client, data: st.DataObject) -> None:
    sid = open_session(http)
    shape = data.draw(st.lists(st.integers(1, 70), min_size=1, max_size=4))
    tensors = {"hidden": (torch.randn(*shape), data.draw(st.sampled_from(list(Encoding)[:4])))}
    if data.draw(st.booleans()):
        tensors["mask"] = (torch.ones(*shape[:2], dtype=torch.uint8), Encoding.U8)
    kind = data.draw(st.sampled_from(list(FrameKind)))
    seq = data.draw(st.sampled_from([0, 1, 2**40]))
    frame = encode_frame(kind, bytes.fromhex(sid), seq, tensors)
    reply = http.post(f"/v1/sessions/{sid}/step", content=frame, headers={"content-type": FRAME_CONTENT_TYPE})
    assert reply.status_code in ERROR_STATUSES | {200}
    if reply.status_code != 200:
        assert is_json_error(reply)
    http.delete(f"/v1/sessions/{sid}")


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
    assert b" 408 " in raw_request(server.url, head, [b"{", b'"wire"'], pause=0.4)


def test_floods_beyond_every_limit(make_server: Callable[..., LiveServer], tiny: Checkpoint) -> None:
    server = make_server(max_sessions=2, rate_limit_per_s=5.0, rate_limit_burst=6)
    with httpx.Client(base_url=server.url, timeout=10) as client:
        statuses = [client.post("/v1/sessions", json={}) for _ in range(3)]
        assert [r.status_code for r in statuses] == [201, 201, 503]
        assert statuses[2].headers["retry-after"] and is_json_error(statuses[2])
        flood = [client.get("/v1/info") for _ in range(10)]
        limited = [r for r in flood if r.status_code == 429]
        assert limited and limited[0].headers["retry-after"] and is_json_error(limited[0])
        assert client.get("/healthz").status_code == 200  # health checks are never rate limited


def test_concurrency_limit_answers_503(make_server: Callable[..., LiveServer]) -> None:
    server = make_server(max_concurrency=1, receive_timeout_s=3)
    parts = urlsplit(server.url)
    hog = socket.create_connection((parts.hostname, parts.port))
    hog.sendall(
        b"POST /v1/sessions HTTP/1.1\r\nHost: x\r\nContent-Length: 10\r\n\r\n{"
    )  # holds the only slot
    time.sleep(0.3)
    try:
        reply = httpx.get(server.url + "/v1/info")
        assert reply.status_code == 503 and reply.headers["retry-after"] and is_json_error(reply)
    finally:
        hog.close()


def test_a_killed_client_leaves_no_session_after_expiry(
    make_server: Callable[..., LiveServer], tiny: Checkpoint
) -> None:
    server = make_server(idle_timeout_s=0.5, expiry_interval_s=0.1)
    client = SplitClient.connect(server.url, security="plain", model=tiny)
    from lambda_split import RemoteTrunk

    trunk = RemoteTrunk(client.transport, Encoding.FP32)
    trunk(torch.randn(1, 3, 64), torch.ones(1, 3))  # mid-generation, then the client vanishes
    client.transport.close()

    def open_sessions() -> float:
        for line in httpx.get(server.url + "/metrics").text.splitlines():
            if line.startswith("lambda_split_open_sessions "):
                return float(line.split()[1])
        raise AssertionError("metric missing")

    assert open_sessions() == 1
    assert wait_for(lambda: open_sessions() == 0, timeout=5)
    assert "lambda_split_sessions_expired_total 1.0" in httpx.get(server.url + "/metrics").text


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
    server = make_server("aesgcm", handshake_rate_per_s=1.0, handshake_burst=3)
    with httpx.Client(base_url=server.url, timeout=10) as client:
        replies = [client.post("/v1/handshake", content=b"\x01\x01" + bytes(64)) for _ in range(6)]
    statuses = [r.status_code for r in replies]
    assert statuses[:3] != [429] * 3 and statuses[3:] == [429] * 3
    assert replies[-1].headers["retry-after"] and is_json_error(replies[-1])
