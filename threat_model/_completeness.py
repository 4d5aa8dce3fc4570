"""Prove a capture complete before judging it: every byte the client's sockets moved is in it.

For one captured session the client's own account (the :class:`ConnectionLedger` of its
sockets and the transport's ``WireStats``) is compared with the capture:

* every connection the client opened to the server was captured, with both directions
  non-empty, its TCP handshake and both closes, and no sequence hole;
* captured payload bytes equal the client socket's byte counters, connection by
  connection (the WebSocket connections of the stream included), and their sum equals
  the transport's own counters;
* the sniffer lost nothing (kernel drops, truncated frames);
* the client opened no connection to anywhere but the server.

Each failure is a named check saying which session and which connection; nothing here
raises on a broken capture.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from threat_model._capture._reassembly import TcpStream
from threat_model._ledger import ClientConnection, ConnectionLedger, Endpoint
from threat_model.capture import Capture

__all__ = ["CHECKS", "SessionCapture", "completeness"]

CHECKS = {
    "sniffer": "capture complete: no kernel drops or truncated frames",
    "reached": "capture complete: the client reached the server",
    "captured": "capture complete: every client connection captured in both directions",
    "tcp": "capture complete: TCP handshake and close seen on every connection",
    "holes": "capture complete: no sequence holes",
    "bytes": "capture complete: captured bytes equal the client's socket counters",
    "transport": "capture complete: socket counters equal the transport's byte counters",
    "elsewhere": "no client connection to anywhere but the server",
}


@dataclass
class SessionCapture:
    """One client session as the suite saw it: the capture, the client's ledger and counters."""

    name: str
    capture: Capture
    ledger: ConnectionLedger
    target: Endpoint  # where the client was told to connect (the server, or the relay in front of it)
    bytes_sent: int  # the transport's WireStats
    bytes_received: int

    def server_connections(self) -> list[ClientConnection]:
        return [c for c in self._mine() if c.remote == self.target]

    def other_connections(self) -> list[ClientConnection]:
        return [c for c in self._mine() if c.remote != self.target]

    def _mine(self) -> list[ClientConnection]:
        return [c for c in self.ledger.client_connections() if c.local not in self.capture.internal]

    def streams(self) -> list[TcpStream]:
        """The captured connections of the client to the server (what the detectors judge)."""
        ends = {c.local for c in self.server_connections()}
        return self.capture.client_streams(ends) if ends else []


def _row(connection: ClientConnection, stream: TcpStream | None) -> dict[str, Any]:
    row: dict[str, Any] = {
        "connection": connection.label(),
        "client_sent": connection.bytes_sent,
        "client_received": connection.bytes_received,
        "captured_c2s": len(stream.c2s.data) if stream else 0,
        "captured_s2c": len(stream.s2c.data) if stream else 0,
    }
    if stream is not None:
        row.update(
            handshake=stream.handshake,
            client_close=stream.c2s.fin or stream.c2s.rst,
            server_close=stream.s2c.fin or stream.s2c.rst or stream.c2s.rst,
            holes=len(stream.c2s.gaps) + len(stream.s2c.gaps),
            unread_after_close=_unread(stream, connection),
        )
    return row


def _unread(stream: TcpStream, connection: ClientConnection) -> int | None:
    """Bytes the server sent once the client had begun to close (after its last write, or after the
    first write that followed the last byte it read) that the client never read: whole TLS records
    (the server's close_notify, or its WebSocket close frame, answering the client's) or whole
    unmasked WebSocket close frames. None if the surplus is anything else, or came earlier."""
    surplus = stream.s2c.data[connection.bytes_received :]
    if len(stream.s2c.data) <= connection.bytes_received:
        return 0
    unread = [c.ts for c in stream.s2c.chunks if c.offset + c.length > connection.bytes_received]
    last_read = max((c.ts for c in stream.s2c.chunks if c.offset < connection.bytes_received), default=0.0)
    # the client's closing writes: after the last byte it read (a WebSocket close frame, then in
    # TLS its close_notify); the server's answers to them may arrive between the two
    closing = [c.ts for c in stream.c2s.chunks if c.ts > last_read]
    last_write = max((c.ts for c in stream.c2s.chunks), default=None)
    late = last_write is not None and (
        all(ts >= last_write for ts in unread) or (bool(closing) and all(ts >= min(closing) for ts in unread))
    )
    pos = 0
    while pos < len(surplus):
        if pos + 5 <= len(surplus) and surplus[pos] in (21, 23) and surplus[pos + 1] == 3:
            pos += 5 + int.from_bytes(surplus[pos + 3 : pos + 5], "big")
        elif pos + 2 <= len(surplus) and surplus[pos] == 0x88 and surplus[pos + 1] <= 125:
            pos += 2 + surplus[pos + 1]  # FIN + close, unmasked, a payload of at most 125 bytes
        else:
            break
    return len(surplus) if late and pos == len(surplus) else None


def completeness(sessions: Sequence[SessionCapture]) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """The completeness section of a mode's report, and its named checks (one per kind)."""
    failed: dict[str, list[str]] = {key: [] for key in CHECKS}
    rows = []
    for session in sessions:
        cap = session.capture
        if cap.drops or cap.truncated:
            failed["sniffer"].append(f"{session.name}: {cap.drops} dropped, {cap.truncated} truncated")
        wanted = session.server_connections()
        if not wanted:
            failed["reached"].append(
                f"{session.name}: no connection to {session.target[0]}:{session.target[1]}"
            )
        by_client = {s.client: s for s in session.streams()}
        connections = []
        for connection in wanted:
            stream = by_client.get(connection.local)
            where = f"{session.name} {connection.label()}"
            connections.append(_row(connection, stream))
            if stream is None or not stream.c2s.data or not stream.s2c.data:
                failed["captured"].append(
                    f"{where}: {'not captured' if stream is None else 'a direction is empty'}"
                )
                if stream is None:
                    continue
            row = connections[-1]
            if not stream.handshake or not row["client_close"] or not row["server_close"]:
                failed["tcp"].append(
                    f"{where}: handshake {row['handshake']}, client close {row['client_close']}, "
                    f"server close {row['server_close']}"
                )
            if stream.c2s.gaps or stream.s2c.gaps:
                holes = sum(b - a for a, b in stream.c2s.gaps + stream.s2c.gaps)
                failed["holes"].append(f"{where}: {holes} bytes missing in holes")
            read = len(stream.s2c.data) - (row["unread_after_close"] or 0)
            if (len(stream.c2s.data), read) != (connection.bytes_sent, connection.bytes_received):
                failed["bytes"].append(
                    f"{where}: captured {len(stream.c2s.data)}/{len(stream.s2c.data)} bytes, "
                    f"the client's socket moved {connection.bytes_sent}/{connection.bytes_received}"
                )
        counted = (sum(c.bytes_sent for c in wanted), sum(c.bytes_received for c in wanted))
        if counted != (session.bytes_sent, session.bytes_received):
            failed["transport"].append(
                f"{session.name}: sockets {counted[0]}/{counted[1]}, "
                f"transport {session.bytes_sent}/{session.bytes_received}"
            )
        elsewhere = []
        for connection in session.other_connections():
            found = cap.client_streams({connection.local})
            sent = sum(len(s.c2s.data) for s in found)
            elsewhere.append(
                {"connection": connection.label(), "client_sent": connection.bytes_sent, "captured_c2s": sent}
            )
            failed["elsewhere"].append(
                f"{session.name} {connection.label()}: {connection.bytes_sent} bytes sent (not the server)"
            )
        rows.append(
            {
                "session": session.name,
                "method": cap.method,
                "all_flows": cap.all_flows,
                "kernel_drops": cap.drops,
                "truncated_frames": cap.truncated,
                "transport_sent": session.bytes_sent,
                "transport_received": session.bytes_received,
                "connections": connections,
                "elsewhere": elsewhere,
            }
        )
    checks = [
        {"check": CHECKS[key], "passed": not problems, "detail": "; ".join(problems[:4]) or "ok"}
        for key, problems in failed.items()
    ]
    return {"sessions": rows, "complete": all(c["passed"] for c in checks)}, checks
