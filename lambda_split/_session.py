"""One trunk session on the server, seen from the client: open, exchange frames, close."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TypeVar

import torch

from lambda_split._codec import Encoding, Frame, FrameError, FrameKind, decode_frame, encode_frame
from lambda_split._errors import ProtocolMismatch
from lambda_split._receipts import ReceiptPolicy
from lambda_split._stream import HTTPLink, Link, check_reply, json_request
from secure_channel import SecurityMode, Transport

__all__ = ["RemoteSession", "check_reply", "connect_verified", "json_request"]

T = TypeVar("T")


class RemoteSession:
    """A session opened on construction; each :meth:`exchange` sends one frame and checks the reply
    answers it (kind, sequence number; the link names the session, so neither frame carries its id:
    lambda_split._codec). ``link`` is a :class:`StreamLink` or
    :class:`HTTPLink`; a bare transport means one HTTP request per operation."""

    def __init__(
        self,
        link: Transport | Link,
        wire: Encoding,
        *,
        receipts: ReceiptPolicy | None = None,
        head_depth: int | None = None,
    ) -> None:
        """With ``receipts``, the session asks the server to sign every step and checks each receipt
        (:mod:`lambda_split._receipts`) before a result is used; a bad one raises ReceiptError.
        ``head_depth`` (None: the split's own) is the layer the session enters the trunk at."""
        self.link: Link = HTTPLink(link) if isinstance(link, Transport) else link
        self.wire = wire
        self.head_depth = head_depth
        options: dict[str, object] = {} if receipts is None else {"receipts": True}
        if head_depth is not None:
            options["head_depth"] = head_depth
        reply = self.link.open(wire.wire_name, options) if options else self.link.open(wire.wire_name)
        try:
            self.session_id = str(reply["session_id"])
            self._raw_id = bytes.fromhex(self.session_id)
        except (ValueError, KeyError, TypeError):
            raise ProtocolMismatch("malformed session reply") from None
        self.seq = 0
        self.closed = False
        try:
            if head_depth is not None and reply.get("head_depth", head_depth) != head_depth:
                raise ProtocolMismatch(
                    f"the server opened the session at another head depth than {head_depth}"
                )
            self.chain = None if receipts is None else receipts.start(reply, wire.wire_name, head_depth)
        except BaseException:  # a refused receipt certificate: the session opened must not linger
            self.close()
            raise

    def exchange(
        self, kind: FrameKind, tensors: Mapping[str, tuple[torch.Tensor, Encoding]], expect: FrameKind
    ) -> Frame:
        frame = encode_frame(kind, None, self.seq, tensors)
        reply = self.link.step(self.session_id, frame)
        if self.chain is not None:
            reply = self.chain.check(self.seq, frame, reply)
        try:
            result = decode_frame(reply)
        except FrameError as exc:
            raise ProtocolMismatch(f"bad frame from server: {exc}") from None
        if result.kind is not expect or result.session_id is not None or result.seq != self.seq:
            raise ProtocolMismatch("server reply does not answer this step")
        self.seq += 1
        return result

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self.link.close(self.session_id)


def connect_verified(
    url: str,
    security: SecurityMode,
    keys: str | Path | None,
    timeout: float,
    verify: Callable[[Transport], T],
    connect: Callable[[str], Transport] | None = None,
) -> T:
    """Open a transport in ``security`` mode (with ``connect(url)`` if given) and hand it to
    ``verify`` (a client's ``from_transport``); the transport is closed again if verification fails."""
    from lambda_split._diagnose import explain
    from secure_channel import connect_transport

    if connect is None:
        transport = connect_transport(url, security, keys_dir=keys, timeout=timeout)
    else:
        transport = connect(url)
    try:
        return verify(transport)
    except Exception as exc:
        transport.close()
        better = explain(exc, url, security, keys, timeout)
        if better is None:
            raise
        raise better from exc
    except BaseException:
        transport.close()
        raise
