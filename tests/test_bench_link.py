"""The benchmark's emulated link: a loopback relay process that delays every byte by half the round
trip each way, below TLS and the channel (``lambda-split bench --sections link``)."""

from __future__ import annotations

import contextlib
import socket
import struct
import threading
import time
from collections.abc import Iterator

import pytest

from lambda_split import Checkpoint, GenerationConfig, SplitClient
from lambda_split.cli.bench._procs import LinkProcess
from tests.secure_channel.conftest import PKI
from tests.server.conftest import start_server

RTT_MS = 60.0


class Echo:
    """A loopback TCP server that echoes each connection's bytes; ``ended`` is set as one closes."""

    def __init__(self) -> None:
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.listener.getsockname()[1]}"
        self.ended = threading.Event()
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            with conn, contextlib.suppress(ConnectionResetError):
                while data := conn.recv(65536):
                    conn.sendall(data)
            self.ended.set()

    def close(self) -> None:
        self.listener.shutdown(socket.SHUT_RDWR)  # wakes the accept() (a close alone does not)
        self.listener.close()
        self.thread.join(10)
        assert not self.thread.is_alive()


@pytest.fixture
def echo() -> Iterator[Echo]:
    server = Echo()
    yield server
    server.close()


def _exchange(sock: socket.socket, data: bytes) -> bytes:
    sock.sendall(data)
    got = b""
    while len(got) < len(data):
        chunk = sock.recv(65536)
        assert chunk, "the relay closed early"
        got += chunk
    return got


def test_bytes_cross_unchanged_after_at_least_the_round_trip_and_the_end_is_passed_on(echo: Echo) -> None:
    with LinkProcess(echo.url, RTT_MS) as link:
        host, port = link.url.removeprefix("http://").split(":")
        with socket.create_connection((host, int(port)), timeout=30) as sock:
            payload = bytes(range(256)) * 1000  # several chunks in flight
            started = time.monotonic()
            assert _exchange(sock, payload) == payload
            assert time.monotonic() - started >= RTT_MS / 1000  # a lower bound: the relay holds every chunk
            started = time.monotonic()
            assert _exchange(sock, b"second") == b"second"
            assert time.monotonic() - started >= RTT_MS / 1000
            sock.shutdown(socket.SHUT_WR)  # the end of the stream crosses too: the echo server closes
            assert sock.recv(10) == b""
    assert link.child.poll() is not None, "the relay process is stopped"


def test_a_client_that_resets_ends_the_relayed_connection_to_the_server(echo: Echo) -> None:
    with LinkProcess(echo.url, 10.0) as link:
        host, port = link.url.removeprefix("http://").split(":")
        sock = socket.create_connection((host, int(port)), timeout=30)
        assert _exchange(sock, b"hello") == b"hello"
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        sock.close()  # a reset, not an end of stream
        assert echo.ended.wait(10), "the relay closed its connection to the server too"


def test_a_split_generation_through_the_link_is_unchanged_in_tls_aesgcm(
    tiny: Checkpoint, tmp_path_factory: pytest.TempPathFactory
) -> None:
    pki = PKI.create(tmp_path_factory.mktemp("link-pki"))
    server = start_server(tiny, "tls+aesgcm", pki.root)
    config = GenerationConfig(max_new_tokens=4)

    def generate(url: str) -> list[int]:
        with SplitClient.connect(url, security="tls+aesgcm", keys=pki.root, model=tiny) as client:
            return client.generate("Hello there", config).token_ids[0]

    try:
        direct = generate(server.url)
        with LinkProcess(server.url, 20.0) as link:
            assert link.url != server.url and generate(link.url) == direct
    finally:
        server.stop()


def test_a_server_url_without_a_port_is_refused_before_any_process_starts() -> None:
    with pytest.raises(ValueError, match="no host and port"):
        LinkProcess("http://127.0.0.1", 10.0)
