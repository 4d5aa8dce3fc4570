"""The routing key: random per transport, in the clear on every request, bound into the channel.

A reverse proxy hashes on ``x-lambda-route`` to keep a session on one replica. In the aesgcm
modes the key is in the handshake transcript and the session, so a proxy that rewrites it (or
moves the session to where another key lives) is refused with an error that names the key.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping

import pytest

from secure_channel import (
    AESGCMTransport,
    AuthenticationError,
    ClientHandshake,
    Credentials,
    PlainTransport,
    Request,
    Response,
    ServerHandshake,
    Stream,
    Transport,
)
from secure_channel._wire import ROUTE_HEADER

from .conftest import EchoServer

FORGED = "f" * 32


class Proxy(Transport):
    """An on-path proxy: records the routing key of every request and rewrites it when told to."""

    def __init__(
        self,
        inner: PlainTransport,
        rewrite: Callable[[str, bytes], bool] = lambda path, body: False,
        strip_echo: bool = False,
    ) -> None:
        self.inner, self.rewrite, self.strip_echo = inner, rewrite, strip_echo
        self.security, self.stats, self.host, self.route = (
            inner.security,
            inner.stats,
            inner.host,
            inner.route,
        )
        self.seen: list[tuple[str, str | None]] = []

    def exchange(self, request: Request) -> Response:
        headers = dict(request.headers)
        if self.rewrite(request.path, request.content):
            headers[ROUTE_HEADER] = FORGED
        self.seen.append((request.path, headers.get(ROUTE_HEADER)))
        response = self.inner.exchange(dataclasses.replace(request, headers=headers))
        if self.strip_echo:
            kept = {k: v for k, v in response.headers.items() if k != ROUTE_HEADER}
            response = dataclasses.replace(response, headers=kept)
        return response

    def open_stream(self, path: str, headers: Mapping[str, str] | None = None) -> Stream:
        out = dict(headers or {})
        if self.rewrite(path, b""):
            out[ROUTE_HEADER] = FORGED
        self.seen.append((path, out.get(ROUTE_HEADER)))
        return self.inner.open_stream(path, out)

    def close(self) -> None:
        self.inner.close()


def _msg(kind: int) -> Callable[[str, bytes], bool]:
    return lambda path, body: path == "/v1/handshake" and len(body) > 1 and body[1] == kind


def test_every_request_of_a_channel_carries_one_random_route(
    servers: dict[str, EchoServer], client_creds: Credentials
) -> None:
    proxy = Proxy(PlainTransport(servers["aesgcm"].url))
    with AESGCMTransport(proxy, client_creds) as t, PlainTransport(servers["plain"].url) as other:
        for _ in range(3):
            assert t.exchange(Request("POST", "/echo", b"x")).status == 200
        assert len(t.route) == 32 and int(t.route, 16) >= 0 and t.route != other.route
    assert [path for path, _ in proxy.seen] == ["/v1/handshake"] * 2 + ["/v1/secure"] * 3
    assert {route for _, route in proxy.seen} == {t.route}


def test_a_rewritten_route_on_a_sealed_request_is_refused(
    servers: dict[str, EchoServer], client_creds: Credentials
) -> None:
    server = servers["aesgcm"]
    proxy = Proxy(PlainTransport(server.url), rewrite=lambda path, body: path == "/v1/secure")
    with AESGCMTransport(proxy, client_creds) as t:
        t.handshake()
        before = len(server.calls)
        with pytest.raises(AuthenticationError, match="routing key x-lambda-route was rewritten"):
            t.exchange(Request("GET", "/whoami"))
        assert len(server.calls) == before  # refused before the app


@pytest.mark.parametrize("strip_echo", [False, True], ids=["echoed", "echo-stripped"])
def test_a_rewritten_route_on_the_first_handshake_message_is_refused(
    servers: dict[str, EchoServer], client_creds: Credentials, strip_echo: bool
) -> None:
    """With the echo, the error names both keys; without it, the transcript still fails msg2."""
    proxy = Proxy(PlainTransport(servers["aesgcm"].url), rewrite=_msg(1), strip_echo=strip_echo)
    expected = "handshake failed" if strip_echo else f"the server saw '{FORGED}'"
    with AESGCMTransport(proxy, client_creds) as t, pytest.raises(AuthenticationError, match=expected):
        t.handshake()


def test_a_route_changed_between_msg1_and_msg3_is_refused(
    servers: dict[str, EchoServer], client_creds: Credentials
) -> None:
    proxy = Proxy(PlainTransport(servers["aesgcm"].url), rewrite=_msg(3))
    with AESGCMTransport(proxy, client_creds) as t, pytest.raises(AuthenticationError, match="routing key"):
        t.handshake()


def test_a_rewritten_route_on_the_stream_upgrade_is_refused(
    servers: dict[str, EchoServer], client_creds: Credentials
) -> None:
    proxy = Proxy(PlainTransport(servers["aesgcm"].url), rewrite=lambda path, body: path == "/v1/stream")
    with AESGCMTransport(proxy, client_creds) as t, pytest.raises(AuthenticationError, match="routing key"):
        t.open_stream("/v1/stream", {ROUTE_HEADER: "a" * 32})
    # the handshake of that stream carried the stream's key, not the transport's
    assert [route for path, route in proxy.seen if path == "/v1/handshake"] == ["a" * 32] * 2


def test_the_transcript_binds_the_route(client_creds: Credentials, server_creds: Credentials) -> None:
    ch = ClientHandshake(client_creds, "localhost", route="a" * 32)
    with pytest.raises(AuthenticationError, match="did not authenticate"):
        ch.process_msg2(ServerHandshake(server_creds, ch.start(), route="b" * 32).msg2)
    same = ClientHandshake(client_creds, "localhost", route="a" * 32)
    server = ServerHandshake(server_creds, same.start(), route="a" * 32)
    msg4, c2s, s2c, _ = server.finish(same.process_msg2(server.msg2))
    assert same.finish(msg4)[1:] == (c2s, s2c)


@pytest.mark.parametrize("route", ["x" * 129, "a b", "é"])
def test_a_malformed_route_is_refused_before_any_traffic(client_creds: Credentials, route: str) -> None:
    with pytest.raises(ValueError, match="routing key"):
        ClientHandshake(client_creds, "localhost", route=route)


def test_reroute_picks_a_new_key_and_a_new_channel(
    servers: dict[str, EchoServer], client_creds: Credentials
) -> None:
    proxy = PlainTransport(servers["aesgcm"].url)
    with AESGCMTransport(proxy, client_creds) as t:
        t.exchange(Request("GET", "/whoami"))
        first, channel = t.route, t._channel
        assert t.reroute() != first and t.route != first
        assert t.exchange(Request("GET", "/whoami")).status == 200
        assert t._channel is not channel and t._channel is not None and t._channel.route == t.route
