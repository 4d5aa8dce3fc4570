"""Unprivileged capture: an in-path TCP relay on loopback that records both directions.

The client connects to the relay's port; the relay connects to the real server and
copies bytes both ways, recording each read with its time. The recording is turned
into synthetic TCP segments (SYN, SYN-ACK, ACK, data with consistent sequence and
acknowledgement numbers, FIN) so that the same reassembly and pcap code serve both
capture methods, and Wireshark can follow the stream.
"""

from __future__ import annotations

import socket
import threading
import time
from dataclasses import dataclass, field
from typing import Literal

from threat_model._capture._packets import ACK, FIN, PSH, SYN, Endpoint, Segment

_READ = 65536
_MAX_SEGMENT = 32768


@dataclass
class _Recording:
    client: Endpoint
    server: Endpoint
    opened: float
    events: list[tuple[float, Literal["c2s", "s2c"], bytes]] = field(default_factory=list)


class TcpRelay:
    """Listen on ``host``:ephemeral and forward every connection to ``host``:``target_port``."""

    def __init__(self, target_port: int, *, host: str = "127.0.0.1") -> None:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self.host = host
        self.target = (host, target_port)
        self._family = family
        self._listener = socket.socket(family, socket.SOCK_STREAM)
        self._listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._listener.bind((host, 0))
        self._listener.listen(64)
        self._listener.settimeout(0.05)  # close() does not wake accept() on Linux; poll instead
        self.port: int = self._listener.getsockname()[1]
        self._lock = threading.Lock()
        self._recordings: list[_Recording] = []
        self._sockets: list[socket.socket] = []
        self._pumps: list[threading.Thread] = []
        #: local endpoints of the relay's own upstream connections (not the client's)
        self.upstream_locals: set[Endpoint] = set()
        self._closed = threading.Event()
        self._acceptor = threading.Thread(target=self._accept, name=f"relay-{self.port}", daemon=True)

    def start(self) -> None:
        self._acceptor.start()

    def _accept(self) -> None:
        while not self._closed.is_set():
            try:
                downstream, peer = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            downstream.settimeout(None)
            opened = time.time()
            try:
                upstream = socket.create_connection(self.target)
            except OSError:
                downstream.close()
                continue
            local = upstream.getsockname()
            with self._lock:
                self.upstream_locals.add((str(local[0]), int(local[1])))
            for sock in (downstream, upstream):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            recording = _Recording((peer[0], peer[1]), self.target, opened)
            with self._lock:
                self._recordings.append(recording)
                self._sockets += [downstream, upstream]
            for source, sink, direction in ((downstream, upstream, "c2s"), (upstream, downstream, "s2c")):
                pump = threading.Thread(
                    target=self._pump, args=(source, sink, direction, recording), daemon=True
                )
                self._pumps.append(pump)
                pump.start()

    def _pump(
        self,
        source: socket.socket,
        sink: socket.socket,
        direction: Literal["c2s", "s2c"],
        recording: _Recording,
    ) -> None:
        try:
            while True:
                data = source.recv(_READ)
                with self._lock:
                    recording.events.append((time.time(), direction, data))
                if not data:
                    sink.shutdown(socket.SHUT_WR)
                    return
                sink.sendall(data)
        except OSError:
            with self._lock:
                recording.events.append((time.time(), direction, b""))

    def stop(self, grace: float = 1.0) -> None:
        """Stop accepting, give open connections ``grace`` seconds to finish, then cut them."""
        self._closed.set()
        self._acceptor.join()
        self._listener.close()
        deadline = time.monotonic() + grace
        for pump in self._pumps:
            pump.join(max(0.0, deadline - time.monotonic()))
        with self._lock:
            for sock in self._sockets:
                sock.close()
        for pump in self._pumps:
            pump.join()

    def segments(self) -> list[Segment]:
        """The recorded conversations as synthetic TCP segments, in time order."""
        with self._lock:
            recordings = [(r, list(r.events)) for r in self._recordings]
        out: list[Segment] = []
        for index, (recording, events) in enumerate(recordings):
            out += _synthesise(recording, events, index)
        return sorted(out, key=lambda s: s.ts)


def _synthesise(
    recording: _Recording, events: list[tuple[float, Literal["c2s", "s2c"], bytes]], index: int
) -> list[Segment]:
    client, server = recording.client, recording.server
    isn = {
        "c2s": (0x1000_0000 + 7919 * index) & 0xFFFFFFFF,
        "s2c": (0x8000_0000 + 104729 * index) & 0xFFFFFFFF,
    }
    t0 = recording.opened
    out = [
        Segment(t0, client, server, isn["c2s"], 0, SYN, b""),
        Segment(t0, server, client, isn["s2c"], isn["c2s"] + 1, SYN | ACK, b""),
        Segment(t0, client, server, isn["c2s"] + 1, isn["s2c"] + 1, ACK, b""),
    ]
    nxt = {"c2s": isn["c2s"] + 1, "s2c": isn["s2c"] + 1}
    ended = {"c2s": False, "s2c": False}
    for ts, direction, data in events:
        other = "s2c" if direction == "c2s" else "c2s"
        src, dst = (client, server) if direction == "c2s" else (server, client)
        if ended[direction]:
            continue
        if not data:
            out.append(Segment(ts, src, dst, nxt[direction], nxt[other], FIN | ACK, b""))
            nxt[direction] += 1
            ended[direction] = True
            continue
        for start in range(0, len(data), _MAX_SEGMENT):
            piece = data[start : start + _MAX_SEGMENT]
            out.append(Segment(ts, src, dst, nxt[direction], nxt[other], PSH | ACK, piece))
            nxt[direction] += len(piece)
    return [
        Segment(s.ts, s.src, s.dst, s.seq & 0xFFFFFFFF, s.ack & 0xFFFFFFFF, s.flags, s.payload) for s in out
    ]
