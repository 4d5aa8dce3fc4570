"""The second auditor of a trunk: an audit replica, another trunk server reached like the main one.

:class:`RemoteReplayer` has the interface of :class:`lambda_split._audit.Replayer` but recomputes on
a replica server instead of local weights. For each audited session it opens a session on the
replica with the fp32 wire and feeds it every step of that session in order (the KV cache needs
them all): the step frame is decoded (its dequantised values are exactly what the audited server
computed on) and sent as fp32, and the replica's output comes back for :func:`judge` to put through
the audited session's wire round trip, as for the local recompute.

The replica sees every hidden state of every audited session: see SECURITY.md ("Audit replicas").
"""

from __future__ import annotations

import contextlib
import os
from collections import OrderedDict
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from lambda_split._codec import Encoding, FrameError, FrameKind, decode_frame
from lambda_split._errors import FingerprintMismatch, ModeMismatch, ProtocolMismatch, SplitError
from lambda_split._stream import StreamLink, make_link
from lambda_split.protocol import llm_step_inputs
from secure_channel import SecurityMode, Transport, TransportError

__all__ = ["RemoteReplayer", "ReplicaMismatch", "connect_replica"]


class ReplicaMismatch(FingerprintMismatch):
    """The audit replica does not serve the trunk (model fingerprint and split) the audited server
    signed for; nothing was sent to it. Exit code 4, like any server that cannot be verified."""


class RemoteReplayer:
    """Replays sessions' step frames on an audit replica behind ``transport`` (one replica session
    per audited session, fp32 wire). ``expected`` (``fingerprint``, ``split``), if given, is checked
    against the replica's /v1/info now; :meth:`check` checks another context later. At most
    ``keep`` replica sessions stay open: opening one more closes the least recently used."""

    def __init__(
        self,
        transport: Transport,
        expected: Mapping[str, Any] | None = None,
        *,
        url: str = "",
        keep: int = 8,
    ) -> None:
        from lambda_split._client import fetch_info

        self.transport = transport
        self.url = url
        self.keep = max(1, keep)
        self.info = fetch_info(transport)
        if self.info.kind != "llm":
            raise ProtocolMismatch(f"the audit replica runs a {self.info.kind} trunk, not a language model")
        if self.info.security != transport.security:
            raise ModeMismatch(f"the audit replica is in mode {self.info.security}, not {transport.security}")
        if expected is not None:
            self.check(expected)
        self.link = make_link(transport, None)
        self._sessions: OrderedDict[str, Any] = OrderedDict()  # audited session id -> RemoteTrunk
        self.steps = 0

    def check(self, context: Mapping[str, Any]) -> None:
        """Refuse a replica whose trunk is not the one in ``context`` (a signed session context or
        the audited server's info): same fingerprint, same split."""
        split = (int(context["split"][0]), int(context["split"][1]))
        where = f" at {self.url}" if self.url else ""
        if self.info.split != split:
            raise ReplicaMismatch(
                f"the audit replica{where} serves split {self.info.split[0]}:{self.info.split[1]}, "
                f"the audited server split {split[0]}:{split[1]}; it cannot reproduce the audited steps"
            )
        if self.info.fingerprint != str(context["fingerprint"]):
            raise ReplicaMismatch(
                f"the audit replica{where} serves trunk fingerprint {self.info.fingerprint}, the audited "
                f"server signed for {context['fingerprint']}; refusing to send it hidden states"
            )

    def run(self, session_id: str, step_frame: bytes) -> tuple[torch.Tensor, torch.Tensor]:
        """``(the replica's output (B, T, C) fp32, mask (B, T))`` for one step frame."""
        from lambda_split._client import RemoteTrunk

        frame = decode_frame(step_frame)
        if frame.kind is not FrameKind.LLM_STEP:
            raise FrameError("not a language-model step frame")
        hidden, mask = llm_step_inputs(frame)  # an absent mask is all ones
        trunk = self._sessions.get(session_id)
        if trunk is None:
            while len(self._sessions) >= self.keep:
                _, oldest = self._sessions.popitem(last=False)
                _close_quietly(oldest)
            trunk = RemoteTrunk(self.link, Encoding.FP32)
            self._sessions[session_id] = trunk
        else:
            self._sessions.move_to_end(session_id)
        out = trunk(hidden.float(), mask)  # (B, T, C)
        self.steps += 1
        return out.float(), mask

    def forget(self, session_id: str) -> None:
        trunk = self._sessions.pop(session_id, None)
        if trunk is not None:
            _close_quietly(trunk)

    @property
    def open_sessions(self) -> int:
        return len(self._sessions)

    def close(self) -> None:
        """Close every replica session, then the link and the transport (errors of a lost replica
        are not raised: there is nothing left to close on it)."""
        try:
            while self._sessions:
                _, trunk = self._sessions.popitem(last=False)
                _close_quietly(trunk)
        finally:
            try:
                if isinstance(self.link, StreamLink):
                    self.link.shutdown()
            finally:
                self.transport.close()

    def __enter__(self) -> RemoteReplayer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _close_quietly(trunk: Any) -> None:
    with contextlib.suppress(SplitError, TransportError):
        trunk.close()


def connect_replica(
    server: str | Transport,
    *,
    security: SecurityMode | None = None,
    keys: str | os.PathLike[str] | None = None,
    expected: Mapping[str, Any] | None = None,
    timeout: float = 60.0,
) -> RemoteReplayer:
    """A verified :class:`RemoteReplayer` for the audit replica at ``server`` (a URL, reached in
    ``security`` mode with the credentials in ``keys`` and the usual mutual authentication, or a
    transport already open). The transport is closed again if the replica cannot be verified."""
    if isinstance(server, Transport):
        try:
            return RemoteReplayer(server, expected)
        except BaseException:
            server.close()
            raise
    if security is None:
        raise ValueError("an audit replica URL needs a security mode")
    from lambda_split._session import connect_verified

    return connect_verified(
        server,
        security,
        None if keys is None else Path(keys),
        timeout,
        lambda transport: RemoteReplayer(transport, expected, url=server),
    )
