"""Classic libpcap files (microsecond timestamps, little-endian), linktype Ethernet."""

from __future__ import annotations

import struct
from collections.abc import Iterable, Iterator
from pathlib import Path

LINKTYPE_ETHERNET = 1
SNAPLEN = 262144
_GLOBAL = struct.Struct("<IHHiIII")
_RECORD = struct.Struct("<IIII")
_MAGIC_US = 0xA1B2C3D4
_MAGIC_NS = 0xA1B23C4D


def write_pcap(path: str | Path, frames: Iterable[tuple[float, bytes]]) -> int:
    """Write ``(timestamp, ethernet frame)`` pairs; return how many records were written."""
    count = 0
    with open(path, "wb") as out:
        out.write(_GLOBAL.pack(_MAGIC_US, 2, 4, 0, 0, SNAPLEN, LINKTYPE_ETHERNET))
        for ts, frame in frames:
            seconds = int(ts)
            micros = min(round((ts - seconds) * 1_000_000), 999_999)
            data = frame[:SNAPLEN]
            out.write(_RECORD.pack(seconds, micros, len(data), len(frame)))
            out.write(data)
            count += 1
    return count


def read_pcap(path: str | Path) -> Iterator[tuple[float, bytes]]:
    """Yield ``(timestamp, frame)`` from a classic pcap file with linktype Ethernet."""
    data = Path(path).read_bytes()
    if len(data) < _GLOBAL.size:
        raise ValueError("not a pcap file: too short")
    (magic,) = struct.unpack_from("<I", data)
    if magic in (_MAGIC_US, _MAGIC_NS):
        endian = "<"
    elif struct.unpack_from(">I", data)[0] in (_MAGIC_US, _MAGIC_NS):
        endian = ">"
    else:
        raise ValueError("not a classic pcap file (bad magic)")
    magic, _, _, _, _, _, linktype = struct.unpack_from(endian + "IHHiIII", data)
    if linktype != LINKTYPE_ETHERNET:
        raise ValueError(f"unsupported pcap linktype {linktype}; expected Ethernet (1)")
    divisor = 1e9 if magic == _MAGIC_NS else 1e6
    record = struct.Struct(endian + "IIII")
    pos = _GLOBAL.size
    while pos + record.size <= len(data):
        seconds, frac, incl, _ = record.unpack_from(data, pos)
        pos += record.size
        if pos + incl > len(data):
            raise ValueError("pcap file is truncated")
        yield seconds + frac / divisor, data[pos : pos + incl]
        pos += incl
