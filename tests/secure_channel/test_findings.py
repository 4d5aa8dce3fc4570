"""Regression tests for the security review of the channel: each one failed on the code before the fix."""

from __future__ import annotations

import asyncio
import dataclasses
import datetime as dt
import socket
import ssl
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from starlette.applications import Starlette
from starlette.requests import Request as StarletteRequest
from starlette.responses import Response as StarletteResponse
from starlette.routing import Route

import secure_channel._middleware as middleware_module
import secure_channel._records as records_module
from secure_channel import (
    AESGCMTransport,
    AuthenticationError,
    ClientHandshake,
    Credentials,
    CredentialsError,
    PlainTransport,
    Request,
    Response,
    ServerHandshake,
    SessionLost,
    Transport,
    TransportError,
    cert_identity,
    client_ssl_context,
    load_credentials,
    uvicorn_config,
)
from secure_channel._keys import _name, _pem, _san
from secure_channel._records import ClientChannel, RecordOpener, ReplayWindow
from secure_channel._wire import ROUTE_HEADER, SECURE_PATH, SESSION_HEADER

from .conftest import PKI, EchoServer, _start

# --- TLS ------------------------------------------------------------------------------------------


def _get(sock: ssl.SSLSocket, path: str = "/whoami") -> bytes:
    sock.sendall(f"GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n".encode())
    data = b""
    while chunk := sock.recv(65536):
        data += chunk
    return data


def test_a_saved_tls_session_cannot_be_resumed(
    servers: dict[str, EchoServer], client_creds: Credentials
) -> None:
    host, port = servers["tls"].url.removeprefix("https://").split(":")
    ctx = client_ssl_context(client_creds)
    with (
        socket.create_connection((host, int(port))) as raw,
        ctx.wrap_socket(raw, server_hostname="localhost") as s,
    ):
        assert _get(s).startswith(b"HTTP/1.1 200")
        saved = s.session  # TLS 1.3 tickets, if any, have arrived with the response
    with (
        socket.create_connection((host, int(port))) as raw,
        ctx.wrap_socket(raw, server_hostname="localhost", session=saved) as again,
    ):
        assert _get(again).startswith(b"HTTP/1.1 200")
        assert not again.session_reused  # a full handshake, with the client certificate


# --- aesgcm client: no duplicate execution --------------------------------------------------------


class ForgesUnknownSession(Transport):
    """On-path attacker: lets the first sealed request through, drops the sealed 200 and forges a 401."""

    def __init__(self, inner: Transport) -> None:
        self.inner, self.security, self.stats = inner, inner.security, inner.stats
        self.host = getattr(inner, "host", "")
        self.forged = 0

    def exchange(self, request: Request) -> Response:
        response = self.inner.exchange(request)
        if request.path == SECURE_PATH and self.forged == 0:
            self.forged += 1
            body = b'{"error": {"code": "unknown_session", "message": "forged"}}'
            return Response(401, body, {"content-type": "application/json"})
        return response

    def close(self) -> None:
        self.inner.close()


def test_a_forged_unknown_session_does_not_make_a_post_run_twice(
    servers: dict[str, EchoServer], client_creds: Credentials
) -> None:
    server = servers["aesgcm"]
    transport = AESGCMTransport(ForgesUnknownSession(PlainTransport(server.url)), client_creds)
    before = server.calls.count("echo")
    with pytest.raises(SessionLost, match="not re-sent"):
        transport.exchange(Request("POST", "/echo", content=b"pay once"))
    assert server.calls.count("echo") - before == 1
    transport.close()


# --- record layer ---------------------------------------------------------------------------------


def test_the_replay_window_shift_is_bounded() -> None:
    window = ReplayWindow()
    window.mark(0)
    window.mark(1 << 62)  # the old code tried to build a 2**62-bit integer here
    assert window.highest == 1 << 62 and window._bitmap == 1


def test_an_absurd_sequence_jump_is_refused_before_the_tag_check(monkeypatch: pytest.MonkeyPatch) -> None:
    sid, key = bytes(range(16)), bytes(32)
    client = ClientChannel(sid, key, bytes(32))
    opener = RecordOpener(key, session_id=sid, direction=1, frame_type=1)
    first, _ = client.seal_request(b"x")
    opener.open(first)
    client._sealer._next_sequence = 1 << 33  # an on-path forger picks any sequence; so can we
    far, _ = client.seal_request(b"y")
    tag_checks: list[int] = []
    real = records_module._aead_open
    monkeypatch.setattr(records_module, "_aead_open", lambda *a: tag_checks.append(1) or real(*a))
    with pytest.raises(AuthenticationError):
        opener.open(far)
    assert tag_checks == []


# --- handshake ------------------------------------------------------------------------------------


def test_a_handshake_object_is_single_use(client_creds: Credentials, server_creds: Credentials) -> None:
    ch = ClientHandshake(client_creds, "localhost")
    sh = ServerHandshake(server_creds, ch.start())
    msg3 = ch.process_msg2(sh.msg2)
    with pytest.raises(AuthenticationError, match="single-use"):
        ch.process_msg2(sh.msg2)  # would seal a second msg3 under the same key and nonce
    msg4 = sh.finish(msg3)[0]
    ch.finish(msg4)
    with pytest.raises(AuthenticationError):
        ch.finish(msg4)
    with pytest.raises(AuthenticationError):
        sh.finish(msg3)


def _without_eku(pki: PKI, base: Credentials, names: list[str]) -> Credentials:
    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.UTC) - dt.timedelta(minutes=5)
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(names[0]))
        .issuer_name(pki.ca.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now)
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), True)
        .add_extension(_san(names), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(pki.ca_key.public_key()), critical=False
        )
        .sign(pki.ca_key, hashes.SHA256())
    )
    return dataclasses.replace(base, cert=cert, private_key=key)


def test_the_aesgcm_handshake_requires_an_eku_in_both_roles(
    pki: PKI, client_creds: Credentials, server_creds: Credentials
) -> None:
    no_eku_client = _without_eku(pki, client_creds, ["lambda-split-client"])
    ch = ClientHandshake(no_eku_client, "localhost")
    sh = ServerHandshake(server_creds, ch.start())
    with pytest.raises(AuthenticationError, match="EKU"):
        sh.finish(ch.process_msg2(sh.msg2))
    no_eku_server = _without_eku(pki, server_creds, ["localhost"])
    ch = ClientHandshake(client_creds, "localhost")
    sh = ServerHandshake(no_eku_server, ch.start())
    with pytest.raises(AuthenticationError, match="EKU"):
        ch.process_msg2(sh.msg2)


def test_a_junk_msg3_does_not_cancel_the_real_handshake(
    servers: dict[str, EchoServer], client_creds: Credentials
) -> None:
    with PlainTransport(servers["aesgcm"].url) as raw:
        ch = ClientHandshake(client_creds, "127.0.0.1", route=raw.route)
        msg2 = raw.exchange(Request("POST", "/v1/handshake", ch.start())).content
        msg3 = ch.process_msg2(msg2)
        junk = msg3[:18] + bytes(len(msg3) - 18)  # same session id, garbage payload
        assert raw.exchange(Request("POST", "/v1/handshake", junk)).status == 401
        answer = raw.exchange(Request("POST", "/v1/handshake", msg3))
        assert answer.status == 200
        ch.finish(answer.content)


def test_handshake_crypto_runs_off_the_event_loop(
    servers: dict[str, EchoServer], client_creds: Credentials, monkeypatch: pytest.MonkeyPatch
) -> None:
    seen: list[tuple[threading.Thread, bool]] = []  # (thread, whether an event loop runs in it)
    real = middleware_module.ServerHandshake

    def on_a_loop() -> bool:
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            return False
        return True

    def recording(*args: object, **kwargs: object) -> object:
        seen.append((threading.current_thread(), on_a_loop()))
        return real(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(middleware_module, "ServerHandshake", recording)
    with AESGCMTransport(PlainTransport(servers["aesgcm"].url), client_creds) as t:
        t.handshake()
    # a worker thread (asyncio's or uvloop's executor), not the server's event loop
    assert seen and not any(loop for _, loop in seen), seen
    assert all(th is not threading.main_thread() for th, _ in seen)


# --- sealed gate ----------------------------------------------------------------------------------


def test_a_bad_inner_request_gets_a_sealed_answer(
    servers: dict[str, EchoServer], client_creds: Credentials
) -> None:
    with AESGCMTransport(PlainTransport(servers["aesgcm"].url), client_creds) as t:
        reply = t.exchange(Request("GET", "/whoami", headers={"x-note": "\u20ac"}))  # not latin-1
        assert reply.status == 400  # it came back inside the channel (the old code: an unsealed 500)


@pytest.fixture
def slow_server(server_creds: Credentials) -> Iterator[tuple[str, threading.Event, list[str]]]:
    release, entered = threading.Event(), list[str]()

    async def slow(request: StarletteRequest) -> StarletteResponse:
        import anyio

        entered.append("slow")
        await anyio.to_thread.run_sync(release.wait, 10)
        return StarletteResponse(b"done")

    app = Starlette(routes=[Route("/slow", slow, methods=["POST"])])
    config = uvicorn_config(app, host="127.0.0.1", port=0, security="aesgcm", credentials=server_creds,
                            log_level="critical", lifespan="off")  # fmt: skip
    server, thread, port = _start(config)
    yield f"http://127.0.0.1:{port}", release, entered
    release.set()
    server.should_exit = True
    thread.join(5)


def test_one_sealed_request_at_a_time_per_session(
    slow_server: tuple[str, threading.Event, list[str]], client_creds: Credentials
) -> None:
    url, release, entered = slow_server
    t = AESGCMTransport(PlainTransport(url), client_creds)
    t.handshake()
    channel = t._channel
    assert channel is not None
    from secure_channel._wire import _encode_request

    first, _ = channel.seal_request(_encode_request(Request("POST", "/slow")))
    second, _ = channel.seal_request(_encode_request(Request("POST", "/slow")))
    headers = {
        SESSION_HEADER: channel.session_id.hex(),
        ROUTE_HEADER: channel.route,
        "content-type": "application/octet-stream",
    }
    statuses: list[int] = []
    with PlainTransport(url) as a, PlainTransport(url) as b:
        worker = threading.Thread(
            target=lambda: statuses.append(a.exchange(Request("POST", SECURE_PATH, first, headers)).status)
        )
        worker.start()
        for _ in range(500):
            if entered:
                break
            threading.Event().wait(0.01)
        assert entered == ["slow"]
        blocked = threading.Thread(
            target=lambda: statuses.append(b.exchange(Request("POST", SECURE_PATH, second, headers)).status)
        )
        blocked.start()
        blocked.join(5)  # the old code let it in: it waits on `release` too
        second_done = not blocked.is_alive()
        release.set()
        worker.join(10)
        blocked.join(10)
    assert second_done and statuses == [409, 200] and entered == ["slow"]
    t.close()


# --- keys -----------------------------------------------------------------------------------------


def test_a_private_key_readable_by_others_is_refused(pki: PKI, tmp_path: Path) -> None:
    d = pki.issue("client", "client", ["lambda-split-client"], directory=tmp_path / "c")
    (d / "client.key").chmod(0o644)
    with pytest.raises(CredentialsError, match="chmod 600"):
        load_credentials(d, "client")
    (d / "client.key").chmod(0o600)
    d.chmod(0o777)
    with pytest.raises(CredentialsError, match="chmod go-w"):
        load_credentials(d, "client")
    d.chmod(0o700)
    load_credentials(d, "client")


def test_the_identity_is_the_public_key_not_the_certificate_bytes(
    pki: PKI, client_creds: Credentials
) -> None:
    cert = client_creds.cert
    # the same key certified twice (or one certificate with its signature re-encoded): one identity
    twin = (
        x509.CertificateBuilder()
        .subject_name(cert.subject)
        .issuer_name(cert.issuer)
        .public_key(cert.public_key())  # type: ignore[arg-type]
        .serial_number(x509.random_serial_number())
        .not_valid_before(cert.not_valid_before_utc)
        .not_valid_after(cert.not_valid_after_utc)
        .sign(pki.ca_key, hashes.SHA256())
    )
    assert _pem(twin) != _pem(cert)
    from cryptography.hazmat.primitives.serialization import Encoding

    assert cert_identity(twin.public_bytes(Encoding.DER)) == cert_identity(client_creds.cert_der)


# --- client reads -----------------------------------------------------------------------------------


@pytest.fixture
def flooding_server() -> Iterator[str]:
    """Answers every request with a 200 whose chunked body never ends (until the client hangs up)."""
    listener = socket.create_server(("127.0.0.1", 0))
    stop = threading.Event()

    def serve() -> None:
        while not stop.is_set():
            try:
                conn, _ = listener.accept()
            except OSError:
                return
            with conn:
                conn.recv(65536)
                conn.sendall(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
                chunk = b"%x\r\n%s\r\n" % (65536, bytes(65536))
                try:
                    for _ in range(1600):  # 100 MiB at most
                        conn.sendall(chunk)
                except OSError:
                    continue

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{listener.getsockname()[1]}"
    stop.set()
    listener.close()
    thread.join(5)


def test_the_client_stops_reading_at_the_response_cap(flooding_server: str) -> None:
    with PlainTransport(flooding_server) as t:
        with pytest.raises(TransportError, match="limit"):
            t.exchange(Request("GET", "/", max_response_bytes=1 << 20))
        assert t.stats.bytes_received < 8 << 20


def test_the_client_stops_reading_a_huge_msg2(flooding_server: str, client_creds: Credentials) -> None:
    with AESGCMTransport(PlainTransport(flooding_server), client_creds) as sealed:
        with pytest.raises(TransportError, match="limit"):
            sealed.handshake()  # a msg2 is a few kB; the old client read all 100 MiB
        assert sealed.stats.bytes_received < 8 << 20


# --- expiry and caps --------------------------------------------------------------------------------


@pytest.fixture
def own_server(request: pytest.FixtureRequest) -> Iterator[list[tuple[object, threading.Thread]]]:
    started: list[tuple[object, threading.Thread]] = []
    yield started
    for server, thread in started:
        server.should_exit = True  # type: ignore[attr-defined]
        thread.join(5)


def _serve(
    started: list[tuple[object, threading.Thread]], app: object, mode: str, creds: Credentials
) -> tuple[object, int]:
    config = uvicorn_config(app, host="127.0.0.1", port=0, security=mode, credentials=creds,  # type: ignore[arg-type]
                            log_level="critical", lifespan="off")  # fmt: skip
    server, thread, port = _start(config)
    started.append((server, thread))
    return config, port


def test_connections_and_sessions_end_when_the_client_certificate_expires(
    own_server: list[tuple[object, threading.Thread]], server_creds: Credentials, client_creds: Credentials
) -> None:
    from .conftest import echo_app

    config, port = _serve(own_server, echo_app([]), "tls", server_creds)
    ctx = client_ssl_context(client_creds)
    with (
        socket.create_connection(("127.0.0.1", port)) as raw,
        ctx.wrap_socket(raw, server_hostname="localhost") as s,
    ):
        s.sendall(b"GET /whoami HTTP/1.1\r\nHost: localhost\r\n\r\n")
        assert s.recv(65536).startswith(b"HTTP/1.1 200")
        live = list(config.http_protocol_class.live or [])  # type: ignore[attr-defined]
        assert len(live) == 1
        left = (client_creds.cert.not_valid_after_utc - dt.datetime.now(dt.UTC)).total_seconds()
        assert abs(live[0]._expiry.when() - live[0].loop.time() - left) < 60  # closes at not-after
    gate = middleware_module.AESGCMMiddleware(echo_app([]), server_creds)
    _, port = _serve(own_server, gate, "aesgcm", server_creds)
    with AESGCMTransport(PlainTransport(f"http://127.0.0.1:{port}"), client_creds) as t:
        t.handshake()
    (session,) = gate._sessions.values()
    assert abs(session.expires - session.created - left) < 60


def test_sealed_bytes_awaiting_authentication_are_capped(
    own_server: list[tuple[object, threading.Thread]], server_creds: Credentials, client_creds: Credentials
) -> None:
    from .conftest import echo_app

    gate = middleware_module.AESGCMMiddleware(
        echo_app([]), server_creds, max_body_bytes=1000, max_unauthenticated_bytes=2000
    )
    _, port = _serve(own_server, gate, "aesgcm", server_creds)
    url = f"http://127.0.0.1:{port}"
    with (
        AESGCMTransport(PlainTransport(url), client_creds) as one,
        AESGCMTransport(PlainTransport(url), client_creds) as two,
    ):
        one.handshake()
        two.handshake()
        assert one._channel is not None and two._channel is not None
        with socket.create_connection(("127.0.0.1", port)) as slow:  # declares 1500 bytes, sends 10
            slow.sendall(
                f"POST {SECURE_PATH} HTTP/1.1\r\nHost: x\r\nContent-Length: 1500\r\n"
                f"{SESSION_HEADER}: {one._channel.session_id.hex()}\r\n"
                f"{ROUTE_HEADER}: {one.route}\r\n\r\n".encode()
                + bytes(10)
            )
            for _ in range(500):
                if gate._buffered:
                    break
                threading.Event().wait(0.01)
            headers = {SESSION_HEADER: two._channel.session_id.hex(), ROUTE_HEADER: two.route}
            with PlainTransport(url) as raw:
                assert raw.exchange(Request("POST", SECURE_PATH, bytes(1000), headers)).status == 503
