"""Real uvicorn servers on loopback, one per mode: round trips, identities, byte counts."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from secure_channel import (
    AESGCMTransport,
    CredentialsError,
    PlainTransport,
    Request,
    TLSTransport,
    Transport,
    TransportError,
    connect_transport,
)

from .conftest import PKI, EchoServer

BODY = bytes(range(256)) * 8  # 2 KiB, every byte value


@pytest.mark.parametrize("mode", ["plain", "tls", "aesgcm", "tls+aesgcm"])
def test_every_mode_round_trips_bytes_and_identity(
    mode: str, servers: dict[str, EchoServer], pki: PKI, client_creds: object
) -> None:
    with connect_transport(servers[mode].url, mode, keys_dir=None if mode == "plain" else pki.root) as t:
        assert t.security == mode
        for body in (BODY, b"", bytes(100_000)):
            r = t.exchange(Request("POST", "/echo", content=body, headers={"content-type": "application/x"}))
            assert r.status == 200 and r.content == body
        expected = None if mode == "plain" else client_creds.identity  # type: ignore[attr-defined]
        assert r.headers["x-peer"] == (expected or "none")
        who = t.exchange(Request("GET", "/whoami?x=1&y=%C3%A9"))
        assert who.json() == {"identity": expected, "query": "x=1&y=%C3%A9"}
        assert t.exchange(Request("GET", "/nope")).status == 404
        assert t.stats.bytes_sent > len(BODY) + 100_000 and t.stats.bytes_received > len(BODY) + 100_000


def test_aesgcm_client_learns_the_server_identity(servers: dict[str, EchoServer], pki: PKI) -> None:
    t = connect_transport(servers["aesgcm"].url, "aesgcm", keys_dir=pki.root)
    assert isinstance(t, AESGCMTransport)
    t.exchange(Request("GET", "/whoami"))
    from secure_channel import load_credentials

    assert t.peer_identity == load_credentials(pki.root, "server").identity
    t.close()
    t.close()  # idempotent


def _exchange_bytes(t: Transport) -> tuple[int, int]:
    before = (t.stats.bytes_sent, t.stats.bytes_received)
    assert t.exchange(Request("POST", "/echo", content=BODY)).content == BODY
    return t.stats.bytes_sent - before[0], t.stats.bytes_received - before[1]


def test_byte_counts_are_socket_bytes(servers: dict[str, EchoServer], pki: PKI) -> None:
    transports = {m: connect_transport(s.url, m, keys_dir=pki.root) for m, s in servers.items()}
    first = {m: _exchange_bytes(t) for m, t in transports.items()}
    steady = {m: _exchange_bytes(t) for m, t in transports.items()}
    sent, received = steady["plain"]
    assert len(BODY) + 60 < sent < len(BODY) + 400  # request line and headers
    assert len(BODY) + 60 < received < len(BODY) + 400
    # TLS adds records (and a handshake on first use); AES-GCM adds a record and metadata.
    assert first["tls"][0] > first["plain"][0] + 500 and first["tls"][1] > first["plain"][1] + 500
    for mode in ("tls", "aesgcm", "tls+aesgcm"):
        assert steady[mode][0] > sent and steady[mode][1] > received
    assert steady["tls+aesgcm"][0] > steady["aesgcm"][0] and steady["tls+aesgcm"][0] > steady["tls"][0]
    for t in transports.values():
        t.close()


def test_factory_refuses_mismatches(servers: dict[str, EchoServer], pki: PKI, tmp_path: Path) -> None:
    with pytest.raises(ValueError):
        connect_transport(servers["tls"].url, "plain")  # https URL with plain: never downgrade
    with pytest.raises(ValueError):
        connect_transport(servers["plain"].url, "tls", keys_dir=pki.root)
    for mode in ("tls", "aesgcm", "tls+aesgcm"):
        with pytest.raises(CredentialsError):
            connect_transport(servers[mode].url, mode)
        with pytest.raises(CredentialsError):
            connect_transport(servers[mode].url, mode, keys_dir=tmp_path)
    with pytest.raises(ValueError):
        connect_transport(servers["plain"].url, "PLAIN")
    with pytest.raises(ValueError):
        PlainTransport("http://127.0.0.1:1/base/path")


def test_unreachable_server_is_a_transport_error(pki: PKI) -> None:
    with PlainTransport("http://127.0.0.1:9", timeout=2) as t, pytest.raises(TransportError):
        t.exchange(Request("GET", "/healthz"))
    with TLSTransport("https://127.0.0.1:9", _client(pki), timeout=2) as t, pytest.raises(TransportError):
        t.exchange(Request("GET", "/healthz"))


def _client(pki: PKI):  # type: ignore[no-untyped-def]
    from secure_channel import load_credentials

    return load_credentials(pki.root, "client")


def test_aesgcm_server_refuses_unsealed_requests(servers: dict[str, EchoServer]) -> None:
    for mode in ("aesgcm",):
        srv = servers[mode]
        calls = len(srv.calls)
        with PlainTransport(srv.url) as raw:
            assert raw.exchange(Request("GET", "/healthz")).json() == {"status": "ok"}
            for method, path in (
                ("POST", "/echo"),
                ("GET", "/whoami"),
                ("GET", "/v1/secure"),
                ("POST", "/healthz"),
            ):
                r = raw.exchange(Request(method, path, content=b"x"))
                assert r.status == 403
                assert json.loads(r.content)["error"]["code"] == "sealed_channel_required"
        assert len(srv.calls) == calls
