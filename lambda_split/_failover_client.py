"""The client's side of failover: move a SplitClient to another server."""

from __future__ import annotations

from typing import TYPE_CHECKING

from lambda_split._errors import FingerprintMismatch, ModeMismatch
from lambda_split._failover import Reconnector, failover_worthy
from lambda_split._stream import HTTPLink, StreamLink, TransportKind, make_link
from secure_channel import Transport, WireStats

if TYPE_CHECKING:
    from lambda_split._client import ServerInfo


class _FailoverMixin:
    """Moving a :class:`SplitClient` to another server; see lambda_split._failover."""

    transport: Transport
    link: HTTPLink | StreamLink
    info: ServerInfo
    url: str
    reconnector: Reconnector | None
    _transport_kind: TransportKind | None
    _retired: WireStats

    def close(self) -> None:
        raise NotImplementedError

    def switch_to(self, url: str) -> None:
        """Move to a new transport to ``url``: a new handshake and routing key, and a server that must
        run the trunk this client verified (else FingerprintMismatch or ModeMismatch, and nothing is sent)."""
        if self.reconnector is None:
            raise RuntimeError("this client has no failover")
        transport = self.reconnector.connect(url)
        try:
            from lambda_split._client import fetch_info  # (the client module imports this one)

            info = fetch_info(transport)
            self._check_same_trunk(info, url, transport.security)
            link = make_link(transport, self._transport_kind)
        except BaseException:
            transport.close()
            raise
        self._retire()
        self.transport, self.link, self.info, self.url = transport, link, info, url

    def _check_same_trunk(self, info: ServerInfo, url: str, security: str) -> None:
        if info.security != security:
            raise ModeMismatch(f"the server at {url} is in mode {info.security}, not {security}")
        ours = self.info
        same = (info.kind, info.fingerprint, info.split, info.num_layers, info.hidden_size) == (
            ours.kind,
            ours.fingerprint,
            ours.split,
            ours.num_layers,
            ours.hidden_size,
        )
        if not same:
            raise FingerprintMismatch(
                f"the server at {url} runs {info.model} [{info.split[0]}:{info.split[1]}] with fingerprint "
                f"{info.fingerprint}, not the trunk this session ran on ({ours.fingerprint}); "
                "refusing to replay the history to it"
            )

    def _retire(self) -> None:
        """Drop the current transport (after a failover); its byte counts stay in :attr:`wire_stats`."""
        stats = self.transport.stats
        self._retired.bytes_sent += stats.bytes_sent
        self._retired.bytes_received += stats.bytes_received
        try:
            self.close()
        except Exception as exc:  # a dead server's socket may fail to close politely
            if not failover_worthy(exc):
                raise

    @property
    def wire_stats(self) -> WireStats:
        """Socket bytes over this client's life, across the transports failover replaced."""
        now = self.transport.stats
        return WireStats(
            self._retired.bytes_sent + now.bytes_sent, self._retired.bytes_received + now.bytes_received
        )
