"""Access logs and metrics record every response as sent on the wire, refusals included,
with bounded label values."""

from __future__ import annotations

import logging
import random
import socket
import string
from collections.abc import Callable, Iterator
from typing import Any
from urllib.parse import urlsplit

import httpx
import pytest

from lambda_split import Checkpoint
from secure_channel import Request, connect_transport
from server.observability import LOGGER, AccessLogMiddleware
from tests.server.conftest import LiveServer, wait_for


class Collect(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.lines: list[dict[str, Any]] = []

    def emit(self, record: logging.LogRecord) -> None:
        if record.getMessage() == "request":
            self.lines.append(dict(getattr(record, "fields", {})))


@pytest.fixture
def logged() -> Iterator[list[dict[str, Any]]]:
    handler = Collect()
    LOGGER.addHandler(handler)
    level = LOGGER.level
    LOGGER.setLevel(logging.INFO)
    try:
        yield handler.lines
    finally:
        LOGGER.removeHandler(handler)
        LOGGER.setLevel(level)


def raw_request(url: str, head: bytes, chunks: list[bytes] = ()) -> bytes:  # type: ignore[assignment]
    parts = urlsplit(url)
    with socket.create_connection((parts.hostname, parts.port), timeout=30) as sock:
        sock.sendall(head)
        for chunk in chunks:
            try:
                sock.sendall(chunk)
            except OSError:
                break
        reply = b""
        while b"\r\n\r\n" not in reply or len(reply.partition(b"\r\n\r\n")[2]) < _length(reply):
            chunk = sock.recv(65536)
            if not chunk:
                break
            reply += chunk
        return reply


def _length(reply: bytes) -> int:
    for line in reply.partition(b"\r\n\r\n")[0].lower().split(b"\r\n"):
        if line.startswith(b"content-length:"):
            return int(line.split(b":")[1])
    return 0


def metric(server: LiveServer, name: str, **labels: str) -> float:
    """The value of one sample of /metrics (0 if absent). Fetched in plain mode only."""
    wanted = name + "{" + ",".join(f'{k}="{v}"' for k, v in sorted(labels.items())) + "}"
    for line in httpx.get(server.url + "/metrics", timeout=30).text.splitlines():
        sample, _, value = line.rpartition(" ")
        if sample == wanted or (not labels and sample == name):
            return float(value)
    return 0.0


def sent(lines: list[dict[str, Any]], status: int, route: str) -> Callable[[], bool]:
    return lambda: any(line["status"] == status and line["route"] == route for line in lines)


def test_the_access_log_is_the_outermost_layer(make_server: Callable[..., LiveServer]) -> None:
    for mode in ("plain", "aesgcm"):
        app = make_server(mode).running.server.config.app
        assert app.user_middleware[0].cls is AccessLogMiddleware


def test_a_chunked_oversized_upload_is_logged_and_counted_as_413(
    make_server: Callable[..., LiveServer], logged: list[dict[str, Any]]
) -> None:
    server = make_server(max_body_bytes=4096)
    chunked = b"POST /v1/sessions HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
    chunk = b"%x\r\n%s\r\n" % (30_000, b"a" * 30_000)
    assert b" 413 " in raw_request(server.url, chunked, [chunk, chunk, b"0\r\n\r\n"])
    assert wait_for(sent(logged, 413, "/v1/sessions"))
    assert not any(line["status"] == 500 for line in logged)
    assert (
        metric(server, "lambda_split_requests_total", method="POST", route="/v1/sessions", status="413") == 1
    )
    assert metric(server, "lambda_split_refusals_total", status="413") == 1


def test_a_declared_too_large_body_is_logged_and_counted(
    make_server: Callable[..., LiveServer], logged: list[dict[str, Any]]
) -> None:
    server = make_server(max_body_bytes=4096)
    head = f"POST /v1/sessions HTTP/1.1\r\nHost: x\r\nContent-Length: {10**6}\r\n\r\n".encode()
    reply = raw_request(server.url, head)
    assert b" 413 " in reply and b"4,096-byte limit" in reply
    assert wait_for(sent(logged, 413, "/v1/sessions"))
    assert (
        metric(server, "lambda_split_requests_total", method="POST", route="/v1/sessions", status="413") == 1
    )


def test_a_lying_content_length_is_logged_and_counted(
    make_server: Callable[..., LiveServer], logged: list[dict[str, Any]]
) -> None:
    server = make_server(receive_timeout_s=0.2)
    head = b"POST /v1/sessions HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n"
    assert b" 408 " in raw_request(server.url, head, [b'{"wire"'])  # 7 of the 100 bytes promised
    assert wait_for(sent(logged, 408, "/v1/sessions"))
    assert (
        metric(server, "lambda_split_requests_total", method="POST", route="/v1/sessions", status="408") == 1
    )


def test_rate_limited_requests_are_logged(
    make_server: Callable[..., LiveServer], logged: list[dict[str, Any]]
) -> None:
    server = make_server(rate_limit_per_s=0.01, rate_limit_burst=1)
    with httpx.Client(base_url=server.url, timeout=30) as client:
        assert [client.get("/v1/info").status_code for _ in range(2)] == [200, 429]
    assert wait_for(sent(logged, 429, "/v1/info"))


def test_sealed_channel_refusals_and_sealed_requests_are_logged(
    make_server: Callable[..., LiveServer], logged: list[dict[str, Any]]
) -> None:
    server = make_server("aesgcm")
    assert httpx.get(server.url + "/v1/info", timeout=30).status_code == 403
    assert wait_for(sent(logged, 403, "/v1/info"))
    with connect_transport(server.url, "aesgcm", keys_dir=server.keys) as transport:
        assert transport.exchange(Request("DELETE", "/v1/sessions/" + "00" * 16)).status == 404
    assert wait_for(lambda: any(line.get("sealed", {}).get("status") == 404 for line in logged))
    line = next(line for line in logged if "sealed" in line)
    assert line["route"] == "/v1/secure" and line["status"] == 200 and line["client"].startswith("sha256:")
    assert line["sealed"] == {"method": "DELETE", "route": "/v1/sessions/{session_id}", "status": 404}


def test_random_paths_and_methods_do_not_grow_metrics(make_server: Callable[..., LiveServer]) -> None:
    server = make_server(rate_limit_per_s=1000, rate_limit_burst=1000)
    rng = random.Random(10)

    def series() -> set[str]:
        text = httpx.get(server.url + "/metrics", timeout=30).text
        return {line.rpartition(" ")[0] for line in text.splitlines() if not line.startswith("#")}

    with httpx.Client(base_url=server.url, timeout=30) as client:
        client.get("/nope")
        client.request("BREW", "/nope")
        client.get("/v1/sessions/" + "ab" * 16)
        series()  # the first scrape adds the /metrics series themselves
        before = series()
        for _ in range(300):
            path = "/" + "".join(rng.choices(string.ascii_letters + "/", k=rng.randint(50, 300)))
            method = "".join(rng.choices(string.ascii_uppercase, k=rng.randint(3, 12)))
            assert client.request(method, path).status_code in {404, 405}
            assert client.get("/v1/sessions/" + rng.randbytes(16).hex()).status_code == 405
    assert series() == before
    assert 'route="unmatched"' in str(before) and 'method="other"' in str(before)
    assert 'route="/v1/sessions/{session_id}"' in str(before)


def test_a_tls_client_is_logged_by_its_certificate_identity(
    live: dict[str, LiveServer], tiny: Checkpoint, logged: list[dict[str, Any]]
) -> None:
    with connect_transport(live["tls"].url, "tls", keys_dir=live["tls"].keys) as transport:
        assert transport.exchange(Request("GET", "/v1/info")).status == 200
    assert wait_for(
        lambda: any(line["client"].startswith("sha256:") and line["route"] == "/v1/info" for line in logged)
    )


def test_batching_figures_are_exported_as_metrics() -> None:
    from prometheus_client import generate_latest

    from lambda_split._buckets import Buckets
    from lambda_split._scheduler import SchedulerStats
    from lambda_split._service import STEP_PHASES, STEP_TIME_BOUNDS
    from server.observability import Metrics

    stats = SchedulerStats()
    stats.batch_rows.update({1: 2, 4: 3})
    for wait in (0.0005, 0.02, 7.0):
        stats.record_wait(wait)

    times = {phase: Buckets(STEP_TIME_BOUNDS) for phase in STEP_PHASES}
    for took in (0.0004, 0.003, 0.06, 20.0):
        times["decode"].record(took)
    times["prefill"].record(0.2)

    class Service:
        open_sessions, cache_bytes, expired, evicted = 3, 4096, 0, 0
        step_times = times

        def __init__(self) -> None:
            self.batching = {**stats.snapshot(), "queued": 1, "slots_used": 10, "slots_total": 64,
                             "slot_bytes_used": 1000, "slot_bytes_total": 6400}  # fmt: skip

    metrics = Metrics()
    metrics.watch(Service())
    text = generate_latest(metrics.registry).decode()
    assert 'lambda_split_batch_rows_bucket{le="4"} 5.0' in text and "lambda_split_batch_rows_sum 14.0" in text
    assert 'lambda_split_step_queue_wait_seconds_bucket{le="0.001"} 1.0' in text
    assert 'lambda_split_step_queue_wait_seconds_bucket{le="5.0"} 2.0' in text
    assert 'lambda_split_step_queue_wait_seconds_bucket{le="+Inf"} 3.0' in text
    assert "lambda_split_step_queue_seconds_max 7.0" in text and "lambda_split_batches_total 5.0" in text
    assert "lambda_split_kv_slot_bytes_used 1000.0" in text and "lambda_split_kv_slots_used 10.0" in text
    assert "lambda_split_steps_queued 1.0" in text
    decode = 'lambda_split_step_seconds_{}{{le="{}",phase="decode"}} {}'
    for le, count in (("0.001", 1.0), ("0.005", 2.0), ("10.0", 3.0), ("+Inf", 4.0)):
        assert decode.format("bucket", le, count) in text
    assert 'lambda_split_step_seconds_count{phase="decode"} 4.0' in text
    assert 'lambda_split_step_seconds_sum{phase="decode"} 20.0634' in text
    assert 'lambda_split_step_seconds_bucket{le="0.1",phase="prefill"} 0.0' in text
    assert 'lambda_split_step_seconds_bucket{le="0.25",phase="prefill"} 1.0' in text
    assert 'lambda_split_step_seconds_count{phase="denoise"} 0.0' in text
