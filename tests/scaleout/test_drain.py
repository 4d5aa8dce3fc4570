"""Drain, in process: after SIGTERM a replica refuses new sessions, finishes the open ones, exits.

The signal is delivered the way the signal handler would deliver it (``handle_exit``), so the
test needs no subprocess; tests/scaleout/test_proxy.py sends a real SIGTERM through nginx.
"""

from __future__ import annotations

import json
import signal
from collections.abc import Callable, Iterator

import pytest

from lambda_split import Checkpoint, GenerationConfig, SplitClient
from lambda_split.protocol import STREAM_PATH, StreamOp
from secure_channel import PlainTransport, Request, Response, TransportError
from tests.secure_channel.conftest import PKI
from tests.server.conftest import LiveServer, start_server

GREEDY = GenerationConfig(max_new_tokens=8, temperature=0.0)
PROMPT = "the quick brown fox"


class Trigger(PlainTransport):
    """A plain transport that runs ``action`` once, just before its ``after``-th step request."""

    def __init__(self, url: str, after: int, action: Callable[[], None]) -> None:
        super().__init__(url)
        self.after, self.action, self.steps = after, action, 0

    def exchange(self, request: Request) -> Response:
        if request.path.endswith("/step"):
            self.steps += 1
            if self.steps == self.after:
                self.action()
        return super().exchange(request)


@pytest.fixture
def replica(tiny: Checkpoint, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    pki = PKI.create(tmp_path_factory.mktemp("drain-pki"))
    server = start_server(tiny, "plain", pki.root, drain_timeout_s=30.0)
    yield server
    server.stop()


def _sigterm(server: LiveServer) -> None:
    server.running.server.handle_exit(signal.SIGTERM, None)


def _json(response: Response) -> object:
    return json.loads(response.content)


def test_sigterm_lets_the_generation_finish_refuses_new_sessions_then_exits(
    replica: LiveServer, tiny: Checkpoint
) -> None:
    with SplitClient.from_transport(PlainTransport(replica.url), tiny) as undisturbed:
        expected = undisturbed.generate(PROMPT, GREEDY).token_ids
    seen: dict[str, object] = {}

    def drain_and_look() -> None:
        _sigterm(replica)
        with PlainTransport(replica.url) as other:
            health = other.exchange(Request("GET", "/healthz"))
            opened = other.exchange(Request("POST", "/v1/sessions", b'{"wire": "fp32"}'))
            seen["health"] = (health.status, _json(health))
            seen["open"] = (opened.status, _json(opened))

    transport = Trigger(replica.url, after=3, action=drain_and_look)
    # One request per step, so the trigger sees them; the stream's drain runs through nginx in test_proxy.
    with SplitClient.from_transport(transport, tiny, transport_kind="http") as client:
        assert client.generate(PROMPT, GREEDY).token_ids == expected
    assert seen["health"] == (503, {"status": "draining"})
    status, body = seen["open"]  # type: ignore[misc]
    assert status == 503 and body["error"]["code"] == "draining"  # type: ignore[index]
    replica.running.thread.join(15)
    assert not replica.running.thread.is_alive()  # every session ended: the drain is over


def test_a_stream_cannot_open_a_session_or_a_new_stream_while_draining(replica: LiveServer) -> None:
    with PlainTransport(replica.url) as transport:
        stream = transport.open_stream(STREAM_PATH)
        _sigterm(replica)
        stream.send(bytes((StreamOp.OPEN,)) + b'{"wire": "fp32"}')
        reply = stream.recv()
        assert reply[0] == StreamOp.ERROR and json.loads(reply[1:])["error"]["code"] == "draining"
        with pytest.raises(TransportError, match=r"HTTP 503 \(draining\)"):
            transport.open_stream(STREAM_PATH)
        stream.close()


def test_a_second_signal_during_a_drain_exits_at_once(replica: LiveServer) -> None:
    with PlainTransport(replica.url) as transport:
        opened = transport.exchange(Request("POST", "/v1/sessions", b'{"wire": "fp32"}'))
        assert opened.status == 201
        _sigterm(replica)
        assert transport.exchange(Request("GET", "/healthz")).status == 503
        replica.running.thread.join(1.0)
        assert replica.running.thread.is_alive()  # a session is open: still draining
        replica.running.server.handle_exit(signal.SIGINT, None)
        replica.running.thread.join(15)
        assert not replica.running.thread.is_alive()


def test_the_drain_deadline_ends_a_drain_that_a_session_keeps_open(
    tiny: Checkpoint, tmp_path_factory: pytest.TempPathFactory
) -> None:
    pki = PKI.create(tmp_path_factory.mktemp("deadline-pki"))
    server = start_server(tiny, "plain", pki.root, drain_timeout_s=0.5)
    try:
        with PlainTransport(server.url) as transport:
            assert transport.exchange(Request("POST", "/v1/sessions", b"{}")).status == 201
            _sigterm(server)
            server.running.thread.join(15)
            assert not server.running.thread.is_alive()
            assert server.service.open_sessions == 1  # abandoned, not waited for beyond the deadline
    finally:
        server.stop()


@pytest.mark.parametrize("timeout_s", [-1.0, float("inf"), float("nan")])
def test_a_drain_timeout_that_is_negative_or_not_finite_is_refused(
    tiny: Checkpoint, tmp_path_factory: pytest.TempPathFactory, timeout_s: float
) -> None:
    from server.config import ConfigError

    pki = PKI.create(tmp_path_factory.mktemp("bad-pki"))
    with pytest.raises(ConfigError, match="drain_timeout_s"):  # an endless drain would never exit
        start_server(tiny, "plain", pki.root, drain_timeout_s=timeout_s)
