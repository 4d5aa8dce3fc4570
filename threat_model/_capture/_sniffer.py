"""Privileged capture: an AF_PACKET raw socket on the loopback interface.

Loopback frames are handed to packet taps twice, once as PACKET_OUTGOING when sent
and once as PACKET_HOST when received; the outgoing copy is dropped so each segment
is recorded exactly once. Timestamps come from the kernel (SO_TIMESTAMPNS).
"""

from __future__ import annotations

import contextlib
import ctypes
import socket
import struct
import threading
import time

from threat_model._capture._packets import Segment, parse_ethernet

ETH_P_ALL = 0x0003
SOL_PACKET = 263
PACKET_STATISTICS = 6
SO_TIMESTAMPNS = 35  # Linux generic value (x86, arm); other arches fall back to time.time()
_MAX_FRAME = 262144
_TIMESPEC = struct.Struct("@qq")
SO_ATTACH_FILTER = 26
# Classic BPF, run in the kernel: drop the PACKET_OUTGOING copy of each loopback frame and
# anything that is not TCP over IPv4 or IPv6, so the socket queues half as much and drops less.
_FILTER = [
    (0x20, 0, 0, 0xFFFFF004),  # ld  pkttype
    (0x15, 8, 0, socket.PACKET_OUTGOING),  # jeq OUTGOING -> drop
    (0x28, 0, 0, 12),  # ldh ethertype
    (0x15, 0, 2, 0x0800),  # jeq IPv4 ? next : ipv6
    (0x30, 0, 0, 23),  # ldb ip protocol
    (0x15, 3, 4, 6),  # jeq TCP -> accept : drop
    (0x15, 0, 3, 0x86DD),  # ipv6: jeq IPv6 ? next : drop
    (0x30, 0, 0, 20),  # ldb next header
    (0x15, 0, 1, 6),  # jeq TCP -> accept : drop
    (0x06, 0, 0, 262144),  # accept
    (0x06, 0, 0, 0),  # drop
]


def _attach_filter(sock: socket.socket) -> None:
    program = ctypes.create_string_buffer(b"".join(struct.pack("HBBI", *insn) for insn in _FILTER))
    fprog = struct.pack("HL", len(_FILTER), ctypes.addressof(program))
    sock.setsockopt(socket.SOL_SOCKET, SO_ATTACH_FILTER, fprog)


class CaptureUnavailable(OSError):
    """This process may not open an AF_PACKET socket (no CAP_NET_RAW, or not Linux)."""


class PacketSniffer:
    """Record TCP frames to or from ``ports`` (every TCP frame if None) on ``interface`` until :meth:`stop`."""

    def __init__(
        self, ports: set[int] | None, *, interface: str = "lo", rcvbuf: int = 64 * 1024 * 1024
    ) -> None:
        if ports is not None and not ports:
            raise ValueError("give at least one port to capture, or None for every port")
        self.ports = set(ports) if ports is not None else None
        self.interface = interface
        self.frames: list[tuple[float, bytes]] = []
        self.segments: list[Segment] = []
        self.drops = 0
        self.truncated = 0
        try:
            sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.ntohs(ETH_P_ALL))
        except (PermissionError, AttributeError, OSError) as exc:
            raise CaptureUnavailable(f"cannot open an AF_PACKET socket: {exc}") from exc
        try:
            try:
                sock.setsockopt(socket.SOL_SOCKET, 33, rcvbuf)  # SO_RCVBUFFORCE (root)
            except OSError:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.SOL_SOCKET, SO_TIMESTAMPNS, 1)
            with contextlib.suppress(OSError):  # the Python-side checks below still hold without it
                _attach_filter(sock)
            sock.bind((interface, 0))
            sock.settimeout(0.05)
        except OSError as exc:
            sock.close()
            raise CaptureUnavailable(f"cannot bind an AF_PACKET socket to {interface}: {exc}") from exc
        self._sock = sock
        self._stop = threading.Event()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="af-packet-capture", daemon=True)

    def start(self) -> None:
        self._read_stats()  # reset kernel counters
        self._thread.start()

    def stop(self) -> None:
        """Drain what the kernel has queued, then stop. Raises if the reader thread failed."""
        self._stop.set()
        self._thread.join()
        self._read_stats()
        self._sock.close()
        if self._error is not None:
            raise RuntimeError("packet capture failed") from self._error

    def _read_stats(self) -> None:
        try:
            raw = self._sock.getsockopt(SOL_PACKET, PACKET_STATISTICS, 8)
        except OSError:
            return
        _, drops = struct.unpack("II", raw)
        self.drops += drops

    def _run(self) -> None:
        try:
            while True:
                try:
                    data, ancillary, flags, address = self._sock.recvmsg(_MAX_FRAME, 64)
                except TimeoutError:
                    if self._stop.is_set():
                        return  # nothing arrived for one timeout after stop(): drained
                    continue
                if address[2] == socket.PACKET_OUTGOING:
                    continue
                if flags & socket.MSG_TRUNC:
                    self.truncated += 1
                ts = _timestamp(ancillary)
                segment = parse_ethernet(data, ts)
                if segment is None:
                    continue
                if self.ports is not None and not (
                    segment.src[1] in self.ports or segment.dst[1] in self.ports
                ):
                    continue
                self.frames.append((ts, data))
                self.segments.append(segment)
        except BaseException as exc:  # surfaced by stop()
            self._error = exc


def _timestamp(ancillary: list[tuple[int, int, bytes]]) -> float:
    for level, kind, payload in ancillary:
        if level == socket.SOL_SOCKET and kind == SO_TIMESTAMPNS and len(payload) >= _TIMESPEC.size:
            seconds, nanos = _TIMESPEC.unpack_from(payload)
            return float(seconds + nanos / 1e9)
    return time.time()
