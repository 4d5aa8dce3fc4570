"""Capture: the bytes a sniffer records are the bytes the peers exchanged, in order."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.threat_model.conftest import METHODS, UpperServer, af_packet_available, talk
from threat_model.capture import capture_loopback, read_pcap, streams_from_pcap

PAYLOAD = os.urandom(200_000) + b"the quick brown fox" * 1000


@pytest.mark.parametrize("method", METHODS)
def test_both_directions_are_reassembled_exactly(method: str, upper_server: UpperServer) -> None:
    with capture_loopback({upper_server.port}, method=method) as cap:
        reply = talk("127.0.0.1", cap.client_port(upper_server.port), PAYLOAD)
    assert reply == PAYLOAD.upper()
    assert cap.method == method
    [stream] = cap.streams()
    assert stream.complete
    assert stream.server == ("127.0.0.1", upper_server.port)
    assert stream.c2s.data == PAYLOAD
    assert stream.s2c.data == PAYLOAD.upper()
    assert stream.c2s.fin and stream.s2c.fin
    assert sum(chunk.length for chunk in stream.c2s.chunks) == len(PAYLOAD)
    assert cap.describe()["method"] == method


@pytest.mark.parametrize("method", METHODS)
def test_separate_connections_stay_separate(method: str, upper_server: UpperServer) -> None:
    messages = [b"first connection " * 50, b"second connection " * 70, b"third " * 10]
    with capture_loopback({upper_server.port}, method=method) as cap:
        for message in messages:
            talk("127.0.0.1", cap.client_port(), message)
    streams = cap.streams()
    assert [s.c2s.data for s in streams] == messages
    assert [s.s2c.data for s in streams] == [m.upper() for m in messages]


@pytest.mark.parametrize("method", METHODS)
def test_only_the_given_ports_are_recorded(method: str, upper_server: UpperServer) -> None:
    other = UpperServer()
    try:
        with capture_loopback({upper_server.port}, method=method) as cap:
            talk("127.0.0.1", other.port, b"not for this capture" * 10)
            talk("127.0.0.1", cap.client_port(), b"for this capture")
    finally:
        other.close()
    assert [s.c2s.data for s in cap.streams()] == [b"for this capture"]
    assert all(other.port not in (s.src[1], s.dst[1]) for s in cap.segments())


def test_ipv6_loopback() -> None:
    try:
        server = UpperServer("::1")
    except OSError:
        pytest.skip("no IPv6 loopback")
    try:
        methods = ["relay", "af_packet"] if af_packet_available() else ["relay"]
        for method in methods:
            with capture_loopback({server.port}, method=method, host="::1") as cap:  # type: ignore[arg-type]
                talk("::1", cap.client_port(), b"over ipv6 " * 100)
            [stream] = cap.streams()
            assert stream.c2s.data == b"over ipv6 " * 100, method
            assert stream.server[0] == "::1"
    finally:
        server.close()


def test_auto_prefers_af_packet_when_privileged(upper_server: UpperServer) -> None:
    with capture_loopback({upper_server.port}) as cap:
        talk("127.0.0.1", cap.client_port(), b"x")
    assert cap.method == ("af_packet" if af_packet_available() else "relay")
    assert (cap.relay_port is None) == (cap.method == "af_packet")


def test_streams_are_not_available_while_capturing(upper_server: UpperServer) -> None:
    with capture_loopback({upper_server.port}, method="relay") as cap, pytest.raises(RuntimeError):
        cap.streams()


def test_bad_arguments_are_refused() -> None:
    with pytest.raises(ValueError), capture_loopback(set()):
        pass
    with pytest.raises(ValueError), capture_loopback({70000}):
        pass
    with pytest.raises(ValueError), capture_loopback({80}, method="tcpdump"):  # type: ignore[arg-type]
        pass


@pytest.mark.parametrize("method", METHODS)
def test_pcap_round_trip(method: str, upper_server: UpperServer, tmp_path: Path) -> None:
    with capture_loopback({upper_server.port}, method=method) as cap:
        talk("127.0.0.1", cap.client_port(), PAYLOAD)
    path = tmp_path / "capture.pcap"
    count = cap.write_pcap(path)
    assert count == len(list(read_pcap(path))) == len(cap.segments())
    [stream] = streams_from_pcap(path, {upper_server.port})
    assert stream.c2s.data == PAYLOAD and stream.s2c.data == PAYLOAD.upper()


@pytest.mark.parametrize("method", METHODS)
def test_tshark_opens_the_pcap_and_follows_the_stream(
    method: str, upper_server: UpperServer, tmp_path: Path
) -> None:
    if shutil.which("tshark") is None:  # a missing tool fails loudly; a skip would hide it
        pytest.fail(
            "tshark is not installed: run `apt-get install -y tshark` (the Makefile set-up does this)"
        )
    message = b"follow me, wireshark " * 3000
    with capture_loopback({upper_server.port}, method=method) as cap:
        talk("127.0.0.1", cap.client_port(), message)
    path = tmp_path / "capture.pcap"
    cap.write_pcap(path)
    follow = subprocess.run(
        ["tshark", "-r", str(path), "-q", "-z", "follow,tcp,raw,0"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert follow.returncode == 0, follow.stderr
    lines = follow.stdout.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("Node 1:")) + 1
    body = [line for line in lines[start:] if line and not line.startswith("=")]
    client = bytes.fromhex("".join(line for line in body if not line.startswith("\t")))
    server = bytes.fromhex("".join(line.strip() for line in body if line.startswith("\t")))
    assert client == message
    assert server == message.upper()
    if method == "relay":  # synthesised frames must carry valid checksums
        bad = subprocess.run(
            ["tshark", "-r", str(path), "-o", "tcp.check_checksum:TRUE", "-o", "ip.check_checksum:TRUE",
             "-Y", "tcp.checksum.status == 0 || ip.checksum.status == 0 || tcp.analysis.flags"],
            capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        assert bad.stdout.strip() == ""
