"""The client's side of failover: move a SplitClient to another server.

The transport a failover replaces is not closed at once: another generation running on the
same client may still use it (its server may be alive: a 404 for one evicted session says
nothing of the others). The last few stay open until :meth:`SplitClient.close`.
"""

from __future__ import annotations

import threading
from typing import TYPE_CHECKING

from lambda_split._codec import Encoding
from lambda_split._errors import FingerprintMismatch, ModeMismatch
from lambda_split._failover import Reconnector, failover_worthy
from lambda_split._stream import HTTPLink, StreamLink, TransportKind, make_link
from lambda_split.protocol import HEALTH_PATH
from secure_channel import AuthenticationError, Request, Transport, TransportError, WireStats

if TYPE_CHECKING:
    from lambda_split._client import RemoteTrunk, ServerInfo

_KEEP_RETIRED = 4


class _FailoverMixin:
    """Moving a :class:`SplitClient` to another server; see lambda_split._failover."""

    transport: Transport
    link: HTTPLink | StreamLink
    info: ServerInfo
    url: str
    reconnector: Reconnector | None
    _transport_kind: TransportKind | None
    _switching: threading.Lock
    _retired: list[tuple[Transport, HTTPLink | StreamLink]]
    _closed_stats: WireStats

    wire: Encoding

    def check_limits(self, batch: int, prompt_tokens: int, max_new_tokens: int) -> int:
        raise NotImplementedError

    def open_trunk(self, head_depth: int | None = None) -> RemoteTrunk:
        """Open a trunk session on the current server (at ``head_depth``; None: the split's own)."""
        from lambda_split._client import RemoteTrunk

        with self._switching:
            link = self.link
        uplink = getattr(self, "uplink", None)  # a quant: defence's encoding (SplitClient), else the wire
        receipts = getattr(self, "receipts", None)
        return RemoteTrunk(link, self.wire, receipts=receipts, head_depth=head_depth, uplink=uplink)

    def replay_chunk(self, request: tuple[int, int, int]) -> int:
        """The prefill chunk on the current server (its limits may differ) for a generation of
        ``(batch, prompt tokens, max new tokens)``."""
        return self.check_limits(*request)

    def switch_to(self, url: str) -> None:
        """Move to a new transport to ``url``: a new handshake and routing key, and a server that must
        run the trunk this client verified (else FingerprintMismatch or ModeMismatch, and nothing is sent)."""
        if self.reconnector is None:
            raise RuntimeError("this client has no failover")
        transport = self.reconnector.connect(url)
        try:
            from lambda_split._client import fetch_info  # (the client module imports this one)

            try:
                info = fetch_info(transport)
            except AuthenticationError as exc:
                if _unavailable_below(transport):
                    raise TransportError(f"the trunk server at {url} is unavailable ({exc})") from exc
                raise
            self._check_same_trunk(info, url, transport.security)
            link = make_link(transport, self._transport_kind)
        except BaseException:
            transport.close()
            raise
        with self._switching:
            self._retired.append((self.transport, self.link))
            self.transport, self.link, self.info, self.url = transport, link, info, url
            while len(self._retired) > _KEEP_RETIRED:
                self._close_retired(*self._retired.pop(0))

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
        if getattr(self, "head_depth", None) is not None:  # sessions replay at their own head depth there
            same = same and (info.depths, info.head_depth_fingerprints) == (
                ours.depths,
                ours.head_depth_fingerprints,
            )
        if not same:
            raise FingerprintMismatch(
                f"the server at {url} runs {info.model} [{info.split[0]}:{info.split[1]}] with fingerprint "
                f"{info.fingerprint}, not the trunk this session ran on ({ours.fingerprint}); "
                "refusing to replay the history to it"
            )

    def _close_retired(self, transport: Transport, link: HTTPLink | StreamLink) -> None:
        stats = transport.stats
        self._closed_stats.bytes_sent += stats.bytes_sent
        self._closed_stats.bytes_received += stats.bytes_received
        try:
            if isinstance(link, StreamLink):
                link.shutdown()
            transport.close()
        except Exception as exc:  # a dead server's socket may not close politely
            if not failover_worthy(exc):
                raise

    def close_retired(self) -> None:
        """Close the transports failover replaced (:meth:`SplitClient.close` does)."""
        with self._switching:
            while self._retired:
                self._close_retired(*self._retired.pop(0))

    @property
    def wire_stats(self) -> WireStats:
        """Socket bytes over this client's life, across the transports failover replaced."""
        with self._switching:
            every = [self._closed_stats, self.transport.stats, *(t.stats for t, _ in self._retired)]
        return WireStats(sum(s.bytes_sent for s in every), sum(s.bytes_received for s in every))


def _unavailable_below(transport: Transport) -> bool:
    """After an AES-GCM handshake was refused: is the server behind it merely unavailable? An
    AESGCMTransport reports any refused handshake as an AuthenticationError, a proxy's 502 and a
    draining server's 503 included; ``/healthz``, unsealed, on the inner transport (same routing
    key) tells. Only a 5xx or a broken connection counts: the retry authenticates all over again."""
    inner = getattr(transport, "inner", None)
    if not isinstance(inner, Transport):
        return False
    try:
        status = inner.exchange(Request("GET", HEALTH_PATH)).status
    except TransportError:
        return True
    except Exception:
        return False
    return status in (502, 503, 504)
