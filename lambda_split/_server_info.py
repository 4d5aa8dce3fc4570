"""What a trunk server says about itself (``GET /v1/info``), parsed and checked by the client."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from lambda_split._errors import LimitExceeded, ProtocolMismatch
from lambda_split._head_depth import RANDOM, HeadDepthChoice, HeadDepths
from lambda_split._stream import check_reply
from lambda_split.protocol import INFO_PATH, check_protocol_version
from secure_channel import Request, Transport

__all__ = ["ServerInfo", "ServerLimits", "fetch_info"]


@dataclass(frozen=True)
class ServerLimits:
    """The limits a server advertises in /v1/info; None where an (older) server does not say."""

    max_batch: int | None = None
    max_step_tokens: int | None = None
    max_tokens_per_session: int | None = None
    max_frame_bytes: int | None = None

    @classmethod
    def parse(cls, data: Any) -> ServerLimits:
        if not isinstance(data, dict):
            return cls()
        values = {}
        for name in ("max_batch", "max_step_tokens", "max_tokens_per_session", "max_frame_bytes"):
            value = data.get(name)
            if isinstance(value, int) and not isinstance(value, bool) and value > 0:
                values[name] = value
        return cls(**values)


@dataclass(frozen=True)
class ServerInfo:
    model: str
    fingerprint: str
    split: tuple[int, int]
    num_layers: int
    hidden_size: int
    security: str
    protocol_version: int
    kind: str = "llm"
    limits: ServerLimits = ServerLimits()
    #: the head depths sessions may choose, and the fingerprint of split d:B for each (a server
    #: without a range: only A)
    head_depths: tuple[int, int] | None = None
    head_depth_fingerprints: tuple[str, ...] = ()

    @property
    def depths(self) -> HeadDepths:
        lo, hi = self.head_depths or (self.split[0], self.split[0])
        return HeadDepths(lo, hi)

    def fingerprint_at(self, depth: int) -> str:
        """The fingerprint the server advertises for split ``depth:B``."""
        if depth == self.split[0]:
            return self.fingerprint
        depths = self.depths
        if depth not in depths or len(self.head_depth_fingerprints) != depths.hi - depths.lo + 1:
            raise ProtocolMismatch(f"the server advertises no fingerprint for head depth {depth}")
        return self.head_depth_fingerprints[depth - depths.lo]

    @classmethod
    def parse(cls, data: Any) -> ServerInfo:
        try:
            start, stop = data["split"]
            depths = data.get("head_depths")
            lo_hi = None if depths is None else (int(depths[0]), int(depths[1]))
            if lo_hi is not None:
                HeadDepths(*lo_hi).check_split(int(start), int(stop))
            return cls(
                str(data["model"]),
                str(data["fingerprint"]),
                (int(start), int(stop)),
                int(data["num_layers"]),
                int(data["hidden_size"]),
                str(data["security"]),
                int(data["protocol_version"]),
                str(data.get("kind", "llm")),
                ServerLimits.parse(data.get("limits")),
                lo_hi,
                tuple(str(p) for p in data.get("head_depth_fingerprints") or ()),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise ProtocolMismatch(f"malformed /v1/info reply: {exc}") from None


def _depths_used(info: ServerInfo, head_depth: HeadDepthChoice | None) -> list[int]:
    """The head depths a client with ``head_depth`` may open sessions at on this server."""
    if head_depth is None:
        return [info.split[0]]
    if head_depth == RANDOM:
        return list(info.depths)
    if head_depth not in info.depths:
        raise LimitExceeded(
            f"head depth {head_depth}; this server allows {info.depths} (head_depths in /v1/info)"
        )
    return [int(head_depth)]


def fetch_info(transport: Transport) -> ServerInfo:
    info = ServerInfo.parse(check_reply(transport.exchange(Request("GET", INFO_PATH)), 200).json())
    check_protocol_version(info.protocol_version)
    return info
