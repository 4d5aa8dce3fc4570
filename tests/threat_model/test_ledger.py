"""The client's ledger: every connection this process opens, with its socket's byte counts."""

from __future__ import annotations

import socket
import subprocess
import sys

from tests.threat_model.conftest import UpperServer, talk
from threat_model._ledger import connection_ledger
from threat_model.capture import capture_loopback


def test_connections_and_bytes_are_recorded(upper_server: UpperServer) -> None:
    with connection_ledger() as ledger:
        reply = talk("127.0.0.1", upper_server.port, b"x" * 100_000)
    assert reply == b"X" * 100_000
    [connection] = ledger.client_connections()
    assert connection.remote == ("127.0.0.1", upper_server.port)
    assert (connection.bytes_sent, connection.bytes_received) == (100_000, 100_000)
    assert "connect" not in vars(socket.socket) and "recv" not in vars(socket.socket)  # patches removed


def test_other_processes_are_not_in_the_ledger_and_the_capture_matches_it(upper_server: UpperServer) -> None:
    code = f"import socket; s = socket.create_connection(('127.0.0.1', {upper_server.port})); s.sendall(b'other'); s.close()"
    with connection_ledger() as ledger, capture_loopback({upper_server.port}, all_flows=True) as cap:
        subprocess.run([sys.executable, "-c", code], check=True, timeout=60)
        talk("127.0.0.1", upper_server.port, b"mine")
        cap.wait_closed({c.local for c in ledger.client_connections()})
    [connection] = ledger.client_connections()
    [stream] = cap.client_streams({connection.local})
    assert (stream.c2s.data, stream.s2c.data) == (b"mine", b"MINE")
    assert len(cap.streams()) >= 2  # the other process's connection was on the wire, and is not ours
