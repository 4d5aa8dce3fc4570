"""An eavesdropper on every hop of a multi-hop trunk, in aesgcm, sees only sealed records.

The three span servers' loopback traffic is captured off the wire (AF_PACKET); the probes are
pieces of the plaintext frames each hop carried, both ways (the device's uplink to span 1, span 1's
answer relayed to span 2, ..., span 3's answer). ``plain`` is the control: the same probes must be
found there, on every hop.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Mapping
from typing import cast

import pytest

from lambda_split import Checkpoint, GenerationConfig, load_llm_service
from lambda_split._chain import ChainClient
from secure_channel import Request, Response, SecurityMode, Stream, Transport, connect_transport
from server import BackgroundServer, ServerConfig
from tests.secure_channel.conftest import PKI
from threat_model.capture import capture_loopback
from threat_model.detectors import TextLeakDetector, scan_streams

PROMPT = "The quick brown fox"
SPANS = ("1:3", "3:5", "5:7")


class Recorder(Transport):
    """Passes everything to ``inner`` and keeps the plaintext bodies it carried, both ways."""

    def __init__(self, inner: Transport) -> None:
        self.inner, self.security, self.stats = inner, inner.security, inner.stats
        self.bodies: list[bytes] = []

    def exchange(self, request: Request) -> Response:
        response = self.inner.exchange(request)
        self.bodies += [request.content, response.content]
        return response

    def open_stream(self, path: str, headers: Mapping[str, str] | None = None) -> Stream:
        return _RecordedStream(self, self.inner.open_stream(path, headers))

    def close(self) -> None:
        self.inner.close()


class _RecordedStream(Stream):
    def __init__(self, recorder: Recorder, inner: Stream) -> None:
        self.recorder, self.inner, self.stats = recorder, inner, inner.stats

    def send(self, message: bytes) -> None:
        self.recorder.bodies.append(message)
        self.inner.send(message)

    def recv(self) -> bytes:
        message = self.inner.recv()
        self.recorder.bodies.append(message)
        return message

    def close(self) -> None:
        self.inner.close()


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> PKI:
    return PKI.create(tmp_path_factory.mktemp("chain-eavesdrop-pki"))


@pytest.fixture
def spans(
    tiny: Checkpoint, pki: PKI, request: pytest.FixtureRequest
) -> Iterator[tuple[str, list[BackgroundServer]]]:
    mode = request.param
    running: list[BackgroundServer] = []
    try:
        for span in SPANS:
            config = ServerConfig(model=tiny.name, split=span, security=mode, keys=str(pki.root), port=0)
            running.append(BackgroundServer(config, load_llm_service(tiny, span, security=mode)))
        yield mode, running
    finally:
        for server in running:
            server.stop()


def _port(url: str) -> int:
    return int(url.rsplit(":", 1)[1].rstrip("/"))


@pytest.mark.parametrize("spans", ["aesgcm", "plain"], indirect=True)
def test_every_hop_carries_only_sealed_records_in_aesgcm(
    spans: tuple[str, list[BackgroundServer]], tiny: Checkpoint, pki: PKI
) -> None:
    name, servers = spans
    mode = cast("SecurityMode", name)
    recorders: dict[int, Recorder] = {}

    def connect(url: str) -> Transport:
        recorders[_port(url)] = Recorder(connect_transport(url, mode, keys_dir=pki.root, timeout=30))
        return recorders[_port(url)]

    ports = [_port(server.url) for server in servers]
    with capture_loopback(set(ports), method="af_packet") as capture:
        for kind in ("stream", "http"):
            with ChainClient.connect(
                [server.url for server in servers],
                security=mode,
                keys=pki.root,
                model=tiny,
                transport_factory=connect,
                transport_kind=kind,
            ) as client:
                text = client.generate(PROMPT, GenerationConfig(max_new_tokens=8)).texts[0]
        time.sleep(0.5)  # let the last segments reach the capture
    streams = capture.streams()
    for port in ports:
        hop = [s for s in streams if s.server[1] == port]
        wire = b"".join(s.c2s.data + s.s2c.data for s in hop)
        frames = [b for b in recorders[port].bodies if len(b) >= 256]
        probes = [b[len(b) // 2 : len(b) // 2 + 32] for b in frames]
        assert hop and probes, f"hop at port {port}: nothing captured or carried"
        found = [p for p in probes if p in wire]
        if mode == "plain":
            assert len(found) == len(probes), f"control: the hop at {port} must show its plain frames"
            continue
        assert not found, f"{len(found)} plaintext frame pieces on the hop at port {port}"
        secrets = [PROMPT, *([text] if len(text) >= 8 else [])]
        assert scan_streams([TextLeakDetector(secrets)], hop) == []
