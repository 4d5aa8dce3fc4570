"""Ethernet / IPv4 / IPv6 / TCP headers: parse captured frames and build synthetic ones."""

from __future__ import annotations

import ipaddress
import socket
import struct
from dataclasses import dataclass

ETH_P_IP = 0x0800
ETH_P_IPV6 = 0x86DD
IPPROTO_TCP = 6

FIN, SYN, RST, PSH, ACK = 0x01, 0x02, 0x04, 0x08, 0x10

_ETH = struct.Struct("!6s6sH")
_IPV4 = struct.Struct("!BBHHHBBH4s4s")
_IPV6 = struct.Struct("!IHBB16s16s")
_TCP = struct.Struct("!HHIIBBHHH")

Endpoint = tuple[str, int]


@dataclass(frozen=True)
class Segment:
    """One TCP segment as seen on the wire (or synthesised by the relay)."""

    ts: float
    src: Endpoint
    dst: Endpoint
    seq: int
    ack: int
    flags: int
    payload: bytes

    @property
    def syn(self) -> bool:
        return bool(self.flags & SYN)

    @property
    def fin(self) -> bool:
        return bool(self.flags & FIN)

    @property
    def rst(self) -> bool:
        return bool(self.flags & RST)


def parse_ethernet(frame: bytes, ts: float) -> Segment | None:
    """Return the TCP segment in an Ethernet frame, or None for anything that is not TCP over IP."""
    if len(frame) < _ETH.size:
        return None
    _, _, ethertype = _ETH.unpack_from(frame)
    return parse_ip(frame[_ETH.size :], ts, ethertype)


def parse_ip(packet: bytes, ts: float, ethertype: int) -> Segment | None:
    if ethertype == ETH_P_IP:
        if len(packet) < _IPV4.size:
            return None
        ver_ihl, _, total, _, frag, _, proto, _, src, dst = _IPV4.unpack_from(packet)
        ihl = (ver_ihl & 0x0F) * 4
        if ver_ihl >> 4 != 4 or proto != IPPROTO_TCP or ihl < 20 or frag & 0x1FFF:
            return None
        # total == 0 happens with BIG TCP / TSO super-packets: trust the captured length then.
        end = total if total else len(packet)
        return _parse_tcp(
            packet[ihl:end], ts, socket.inet_ntop(socket.AF_INET, src), socket.inet_ntop(socket.AF_INET, dst)
        )
    if ethertype == ETH_P_IPV6:
        if len(packet) < _IPV6.size:
            return None
        _, length, next_header, _, src, dst = _IPV6.unpack_from(packet)
        if next_header != IPPROTO_TCP:
            return None  # extension headers do not occur on loopback TCP
        end = _IPV6.size + length if length else len(packet)
        return _parse_tcp(
            packet[_IPV6.size : end],
            ts,
            socket.inet_ntop(socket.AF_INET6, src),
            socket.inet_ntop(socket.AF_INET6, dst),
        )
    return None


def _parse_tcp(data: bytes, ts: float, src: str, dst: str) -> Segment | None:
    if len(data) < _TCP.size:
        return None
    sport, dport, seq, ack, offset, flags, _, _, _ = _TCP.unpack_from(data)
    header = (offset >> 4) * 4
    if header < 20 or header > len(data):
        return None
    return Segment(ts, (src, sport), (dst, dport), seq, ack, flags, bytes(data[header:]))


def _checksum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\x00"
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return int(~total & 0xFFFF)


def build_ethernet(segment: Segment, *, ip_id: int = 0) -> bytes:
    """Synthesise a valid Ethernet/IP/TCP frame (correct lengths and checksums) for ``segment``."""
    src_ip = ipaddress.ip_address(segment.src[0])
    dst_ip = ipaddress.ip_address(segment.dst[0])
    if src_ip.version != dst_ip.version:
        raise ValueError("source and destination must use the same IP version")
    tcp = bytearray(
        _TCP.pack(
            segment.src[1],
            segment.dst[1],
            segment.seq & 0xFFFFFFFF,
            segment.ack & 0xFFFFFFFF,
            5 << 4,
            segment.flags,
            65535,
            0,
            0,
        )
    )
    tcp += segment.payload
    if src_ip.version == 4:
        pseudo = src_ip.packed + dst_ip.packed + struct.pack("!BBH", 0, IPPROTO_TCP, len(tcp))
    else:
        pseudo = src_ip.packed + dst_ip.packed + struct.pack("!IxxxB", len(tcp), IPPROTO_TCP)
    struct.pack_into("!H", tcp, 16, _checksum(pseudo + bytes(tcp)))
    if src_ip.version == 4:
        total = _IPV4.size + len(tcp)
        if total > 0xFFFF:
            raise ValueError("segment too large for one IPv4 packet")
        header = bytearray(
            _IPV4.pack(
                0x45, 0, total, ip_id & 0xFFFF, 0x4000, 64, IPPROTO_TCP, 0, src_ip.packed, dst_ip.packed
            )
        )
        struct.pack_into("!H", header, 10, _checksum(bytes(header)))
        ethertype = ETH_P_IP
    else:
        header = bytearray(_IPV6.pack(6 << 28, len(tcp), IPPROTO_TCP, 64, src_ip.packed, dst_ip.packed))
        ethertype = ETH_P_IPV6
    return _ETH.pack(b"\x00" * 6, b"\x00" * 6, ethertype) + bytes(header) + bytes(tcp)
