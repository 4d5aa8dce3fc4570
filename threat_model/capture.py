"""Record the real packets of TCP conversations on loopback.

Two methods, and every :class:`Capture` says which one it used:

``af_packet``
    An ``AF_PACKET`` raw socket bound to ``lo`` (needs root or CAP_NET_RAW). It sees
    exactly what any local packet sniffer would see, TLS records and all.
``relay``
    An in-path TCP relay on loopback (no privileges). The client must connect to
    :meth:`Capture.client_port` instead of the server's port. The bytes recorded are
    the bytes on the wire, but TCP segmentation and timing are the relay's, not the
    client's.

``auto`` tries ``af_packet`` and falls back to ``relay``::

    with capture_loopback({server_port}) as cap:
        run_client(port=cap.client_port(server_port))
    for stream in cap.streams():
        stream.c2s.data, stream.s2c.data
    cap.write_pcap("conversation.pcap")
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Literal

from threat_model._capture._packets import Endpoint, Segment, build_ethernet, parse_ethernet
from threat_model._capture._pcap import read_pcap, write_pcap
from threat_model._capture._reassembly import (
    Chunk,
    Direction,
    DirectionName,
    TcpStream,
    reassemble,
    reassemble_clients,
)
from threat_model._capture._relay import TcpRelay
from threat_model._capture._sniffer import CaptureUnavailable, PacketSniffer

Method = Literal["auto", "af_packet", "relay"]

__all__ = [
    "Capture",
    "CaptureUnavailable",
    "Chunk",
    "Direction",
    "DirectionName",
    "Method",
    "Segment",
    "TcpStream",
    "capture_loopback",
    "read_pcap",
    "streams_from_pcap",
]


class Capture:
    """The result of :func:`capture_loopback`; the streams are available once the block exits."""

    def __init__(self, ports: frozenset[int], method: Literal["af_packet", "relay"], host: str) -> None:
        self.ports = ports
        self.method: Literal["af_packet", "relay"] = method
        self.host = host
        self.relay_ports: dict[int, int] = {}
        #: True when every TCP flow on loopback was recorded, not only those touching ``ports``
        self.all_flows = False
        #: local endpoints of the capture's own connections (the relay's upstream side)
        self.internal: set[Endpoint] = set()
        self.drops = 0
        self.truncated = 0
        self._segments: list[Segment] | None = None
        self._live: list[Segment] | None = None  # the sniffer's list while it runs
        self._frames: list[tuple[float, bytes]] | None = None

    @property
    def relay_port(self) -> int | None:
        """The relay's port when exactly one server port is relayed, else None (af_packet)."""
        if len(self.relay_ports) == 1:
            return next(iter(self.relay_ports.values()))
        return None

    def client_port(self, server_port: int | None = None) -> int:
        """The port a client should connect to in order to reach ``server_port`` through the capture."""
        if server_port is None:
            if len(self.ports) != 1:
                raise ValueError("several ports are captured; say which server port")
            server_port = next(iter(self.ports))
        if server_port not in self.ports:
            raise ValueError(f"port {server_port} is not captured")
        return self.relay_ports.get(server_port, server_port)

    def _finish(self, segments: list[Segment], frames: list[tuple[float, bytes]] | None) -> None:
        self._segments = segments
        self._frames = frames

    def segments(self) -> list[Segment]:
        if self._segments is None:
            raise RuntimeError("the capture is still running; read it after the with-block")
        return list(self._segments)

    def frames(self) -> list[tuple[float, bytes]]:
        """``(timestamp, Ethernet frame)`` pairs: captured ones, or synthesised for the relay."""
        if self._frames is None:
            self._frames = [(s.ts, build_ethernet(s, ip_id=i)) for i, s in enumerate(self.segments())]
        return list(self._frames)

    def streams(self) -> list[TcpStream]:
        """Reassembled connections touching the captured ports, in the order they started."""
        return reassemble(self.segments(), set(self.ports))

    def client_streams(self, clients: set[Endpoint]) -> list[TcpStream]:
        """Every captured connection with one end in ``clients``, oriented from that end."""
        return reassemble_clients(self.segments(), clients)

    def wait_closed(self, clients: set[Endpoint], timeout: float = 10.0) -> bool:
        """Inside the block: wait until both ends of each client connection closed (FIN or RST).

        The client closes its sockets before the block ends, but the server's FIN may still be
        on its way; returning early would cut it off. The relay's own shutdown handles this.
        """
        if self._live is None:
            return True
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            ends = [s for s in list(self._live) if s.fin or s.rst]
            if all(_closed(c, ends) for c in clients):
                return True
            time.sleep(0.01)
        return False

    def replace_segments(self, segments: list[Segment]) -> None:
        """Swap in other segments (used to plant capture faults in the suite's self-test)."""
        self._segments = list(segments)
        self._frames = None

    def write_pcap(self, path: str | Path) -> int:
        """Write a classic libpcap file (linktype Ethernet); return the number of packets."""
        return write_pcap(path, self.frames())

    def describe(self) -> dict[str, Any]:
        streams = self.streams()
        return {
            "method": self.method,
            "ports": sorted(self.ports),
            "packets": len(self.segments()),
            "connections": len(streams),
            "complete": all(s.complete for s in streams),
            "kernel_drops": self.drops,
            "truncated_frames": self.truncated,
        }


def _closed(client: Endpoint, ends: list[Segment]) -> bool:
    """The client sent FIN or RST, and the server sent FIN or RST (or the client reset it)."""
    client_closed = any(s.src == client for s in ends)
    return client_closed and any(s.dst == client or (s.src == client and s.rst) for s in ends)


@contextmanager
def capture_loopback(
    ports: Iterable[int], *, method: Method = "auto", host: str = "127.0.0.1", all_flows: bool = False
) -> Iterator[Capture]:
    """Capture TCP traffic to or from ``ports`` on loopback for the duration of the block.

    ``method="af_packet"`` raises :class:`CaptureUnavailable` without CAP_NET_RAW;
    ``"auto"`` falls back to the relay then. ``host`` is the relay's address and the
    server address it forwards to (``127.0.0.1`` or ``::1``). With ``all_flows`` the
    packet sniffer keeps every TCP flow on loopback (the relay can only see ``ports``).
    """
    wanted = frozenset(int(p) for p in ports)
    if not wanted or any(not 0 < p < 65536 for p in wanted):
        raise ValueError("ports must be a non-empty set of TCP port numbers")
    if method not in ("auto", "af_packet", "relay"):
        raise ValueError(f"unknown capture method {method!r}")
    sniffer: PacketSniffer | None = None
    if method in ("auto", "af_packet"):
        try:
            sniffer = PacketSniffer(None if all_flows else set(wanted))
        except CaptureUnavailable:
            if method == "af_packet":
                raise
    if sniffer is not None:
        capture = Capture(wanted, "af_packet", host)
        capture.all_flows = all_flows
        capture._live = sniffer.segments
        sniffer.start()
        try:
            yield capture
        finally:
            sniffer.stop()
            capture.drops, capture.truncated = sniffer.drops, sniffer.truncated
            capture._live = None
            capture._finish(sniffer.segments, sniffer.frames)
        return
    capture = Capture(wanted, "relay", host)
    relays = {port: TcpRelay(port, host=host) for port in sorted(wanted)}
    for port, relay in relays.items():
        capture.relay_ports[port] = relay.port
        relay.start()
    try:
        yield capture
    finally:
        for relay in relays.values():
            relay.stop()
            capture.internal |= relay.upstream_locals
        segments = sorted((s for r in relays.values() for s in r.segments()), key=lambda s: s.ts)
        capture._finish(segments, None)


def streams_from_pcap(path: str | Path, ports: Iterable[int]) -> list[TcpStream]:
    """Reassemble the TCP connections touching ``ports`` from a pcap file (ours or tcpdump's)."""
    segments = [s for ts, frame in read_pcap(path) if (s := parse_ethernet(frame, ts)) is not None]
    return reassemble(segments, {int(p) for p in ports})
