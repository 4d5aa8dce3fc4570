"""A handshake refused for now (``503 overloaded``) is retried after the server's Retry-After, and
a server that keeps refusing gives a typed :class:`ServerBusy`, not an authentication failure."""

from __future__ import annotations

import threading
from collections.abc import Iterator

import pytest

import secure_channel._aesgcm as aesgcm_module
import secure_channel._middleware as middleware_module
from secure_channel import (
    AESGCMTransport,
    AuthenticationError,
    ClientHandshake,
    Credentials,
    PlainTransport,
    Request,
    ServerBusy,
)
from secure_channel._uvicorn import uvicorn_config

from .conftest import _start, echo_app


@pytest.fixture
def held_server(
    server_creds: Credentials, monkeypatch: pytest.MonkeyPatch
) -> Iterator[tuple[str, threading.Event, middleware_module.AESGCMMiddleware]]:
    """An aesgcm server that admits one handshake at a time and holds each until ``release`` is set."""
    release, real = threading.Event(), middleware_module.ServerHandshake

    def held(*args: object, **kwargs: object) -> object:
        release.wait(30)
        return real(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(middleware_module, "ServerHandshake", held)
    gate = middleware_module.AESGCMMiddleware(echo_app([]), server_creds, max_handshakes_in_flight=1)
    config = uvicorn_config(gate, host="127.0.0.1", port=0, security="aesgcm", credentials=server_creds,  # type: ignore[arg-type]
                            log_level="critical", lifespan="off")  # fmt: skip
    server, thread, port = _start(config)
    try:
        yield f"http://127.0.0.1:{port}", release, gate
    finally:
        release.set()
        server.should_exit = True
        thread.join(10)


def _occupy(url: str, creds: Credentials, gate: middleware_module.AESGCMMiddleware) -> threading.Thread:
    """A first client whose handshake holds the server's only slot."""
    first = AESGCMTransport(PlainTransport(url), creds)
    worker = threading.Thread(target=lambda: (first.handshake(), first.close()))
    worker.start()
    for _ in range(1000):
        if gate._handshakes:
            return worker
        threading.Event().wait(0.01)
    raise AssertionError("the first handshake never reached the server")


def test_handshakes_in_flight_are_capped_with_a_503_and_retry_after(
    held_server: tuple[str, threading.Event, middleware_module.AESGCMMiddleware], client_creds: Credentials
) -> None:
    url, release, gate = held_server
    worker = _occupy(url, client_creds, gate)
    with PlainTransport(url) as raw:
        msg1 = ClientHandshake(client_creds, "localhost").start()
        refused = raw.exchange(Request("POST", "/v1/handshake", msg1))
    release.set()
    worker.join(30)
    assert refused.status == 503 and refused.json()["error"]["code"] == "overloaded"
    assert refused.headers["retry-after"] == "1"


def test_a_refused_handshake_is_retried_after_retry_after(
    held_server: tuple[str, threading.Event, middleware_module.AESGCMMiddleware],
    client_creds: Credentials,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    url, release, gate = held_server
    waits: list[float] = []

    def sleep(seconds: float) -> None:  # the first client finishes while this one waits
        waits.append(seconds)
        release.set()
        worker.join(30)

    monkeypatch.setattr(aesgcm_module, "_sleep", sleep)
    worker = _occupy(url, client_creds, gate)
    with AESGCMTransport(PlainTransport(url), client_creds) as second:
        second.handshake()
        assert second.peer_identity is not None
    assert len(waits) == 1 and 1.0 <= waits[0] <= 1.25  # the server's Retry-After: 1, plus jitter


def test_a_server_that_stays_busy_gives_server_busy(
    held_server: tuple[str, threading.Event, middleware_module.AESGCMMiddleware],
    client_creds: Credentials,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    url, release, gate = held_server
    waits: list[float] = []
    monkeypatch.setattr(aesgcm_module, "_sleep", waits.append)
    worker = _occupy(url, client_creds, gate)
    with AESGCMTransport(PlainTransport(url), client_creds) as second, pytest.raises(ServerBusy) as caught:
        second.handshake()
    release.set()
    worker.join(30)
    assert not isinstance(caught.value, AuthenticationError)
    assert caught.value.retry_after == 1.0 and "overloaded" in str(caught.value)
    assert len(waits) == aesgcm_module._BUSY_RETRIES


def test_a_server_that_asks_for_a_long_wait_gets_no_retry(
    server_creds: Credentials, client_creds: Credentials, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Sleeping a few seconds when the server asked for minutes only adds load: ServerBusy at once."""
    waits: list[float] = []
    monkeypatch.setattr(aesgcm_module, "_sleep", waits.append)
    gate = middleware_module.AESGCMMiddleware(echo_app([]), server_creds, handshake_rate=(0.01, 1))
    config = uvicorn_config(gate, host="127.0.0.1", port=0, security="aesgcm", credentials=server_creds,  # type: ignore[arg-type]
                            log_level="critical", lifespan="off")  # fmt: skip
    server, thread, port = _start(config)
    try:
        url = f"http://127.0.0.1:{port}"
        with AESGCMTransport(PlainTransport(url), client_creds) as first:
            first.handshake()  # the burst of one
        with (
            AESGCMTransport(PlainTransport(url), client_creds) as second,
            pytest.raises(ServerBusy) as caught,
        ):
            second.handshake()
    finally:
        server.should_exit = True
        thread.join(10)
    assert "rate_limited" in str(caught.value) and caught.value.retry_after is not None
    assert caught.value.retry_after > aesgcm_module._BUSY_MAX_WAIT_S and waits == []
