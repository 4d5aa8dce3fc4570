"""The client's own account of its connections: every TCP connect of this process, and its bytes.

While a :class:`ConnectionLedger` is active, ``socket.socket.connect`` / ``connect_ex`` record
the socket's local and remote address right after the kernel assigned the local port, and
``send`` / ``sendall`` / ``recv`` / ``recv_into`` add to that socket's byte counters. The
capture is then judged against this ledger: a connection the ledger knows but the capture
missed, a byte count that differs, or a connection to anywhere but the server is a named
failure. Unrelated loopback traffic (other processes, other test runs) never matches a
ledger entry, so it is neither a finding nor counted.

Only sockets created through Python's :mod:`socket` module are seen (that is every socket
of the Λ-Split client); a C extension opening its own sockets would not be.
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

Endpoint = tuple[str, int]

_LOCK = threading.Lock()
_ACTIVE: list[ConnectionLedger] = []
_ORIGINAL: dict[str, Any] = {}
_OWN: dict[str, bool] = {}


@dataclass
class ClientConnection:
    """One outgoing TCP connection of this process, as its socket saw it."""

    local: Endpoint
    remote: Endpoint
    opened: float
    thread: str
    bytes_sent: int = 0
    bytes_received: int = 0

    def label(self) -> str:
        return f"{self.local[0]}:{self.local[1]} -> {self.remote[0]}:{self.remote[1]}"


@dataclass
class ConnectionLedger:
    """Every connection opened while active; ``ignore`` holds local endpoints the suite itself uses."""

    connections: list[ClientConnection] = field(default_factory=list)
    ignore: set[Endpoint] = field(default_factory=set)
    _by_socket: dict[int, ClientConnection] = field(default_factory=dict, repr=False)
    # strong references, so a socket id is never reused by another socket while the ledger lives
    _sockets: list[socket.socket] = field(default_factory=list, repr=False)

    def client_connections(self) -> list[ClientConnection]:
        return [c for c in self.connections if c.local not in self.ignore]

    def _opened(self, sock: socket.socket, address: Any) -> None:
        if sock.family not in (socket.AF_INET, socket.AF_INET6) or sock.type != socket.SOCK_STREAM:
            return
        try:
            local = sock.getsockname()
        except OSError:
            return
        try:
            remote = sock.getpeername()
        except OSError:  # a non-blocking connect in progress has no peer yet: take what was asked for
            remote = address
        if not isinstance(remote, tuple) or len(remote) < 2 or not local[1]:
            return
        record = ClientConnection(
            (str(local[0]), int(local[1])),
            (str(remote[0]), int(remote[1])),
            time.time(),
            threading.current_thread().name,
        )
        with _LOCK:
            self.connections.append(record)
            self._by_socket[id(sock)] = record
            self._sockets.append(sock)


def _record_connect(sock: socket.socket, address: Any) -> None:
    for ledger in list(_ACTIVE):
        ledger._opened(sock, address)


def _count(sock: socket.socket, sent: int, received: int) -> None:
    for ledger in _ACTIVE:
        record = ledger._by_socket.get(id(sock))
        if record is not None:
            record.bytes_sent += sent
            record.bytes_received += received


def _connect(self: socket.socket, address: Any) -> None:
    try:
        _ORIGINAL["connect"](self, address)
    finally:
        _record_connect(self, address)


def _connect_ex(self: socket.socket, address: Any) -> int:
    result: int = _ORIGINAL["connect_ex"](self, address)
    _record_connect(self, address)
    return result


def _send(self: socket.socket, data: Any, *args: Any) -> int:
    sent: int = _ORIGINAL["send"](self, data, *args)
    _count(self, sent, 0)
    return sent


def _sendall(self: socket.socket, data: Any, *args: Any) -> None:
    _ORIGINAL["sendall"](self, data, *args)
    _count(self, memoryview(data).nbytes, 0)


def _recv(self: socket.socket, size: int, *args: Any) -> bytes:
    data: bytes = _ORIGINAL["recv"](self, size, *args)
    _count(self, 0, len(data))
    return data


def _recv_into(self: socket.socket, buffer: Any, *args: Any) -> int:
    size: int = _ORIGINAL["recv_into"](self, buffer, *args)
    _count(self, 0, size)
    return size


_PATCHES = {
    "connect": _connect,
    "connect_ex": _connect_ex,
    "send": _send,
    "sendall": _sendall,
    "recv": _recv,
    "recv_into": _recv_into,
}


@contextmanager
def connection_ledger() -> Iterator[ConnectionLedger]:
    """Record this process's outgoing TCP connections and their bytes for the duration of the block."""
    ledger = ConnectionLedger()
    with _LOCK:
        if not _ACTIVE:
            for name, patch in _PATCHES.items():
                _ORIGINAL[name] = getattr(socket.socket, name)
                _OWN[name] = name in vars(socket.socket)  # else inherited from _socket.socket
                setattr(socket.socket, name, patch)
        _ACTIVE.append(ledger)
    try:
        yield ledger
    finally:
        with _LOCK:
            _ACTIVE.remove(ledger)
            if not _ACTIVE:
                for name in _PATCHES:
                    original = _ORIGINAL.pop(name)
                    if _OWN.pop(name):
                        setattr(socket.socket, name, original)
                    else:
                        delattr(socket.socket, name)
