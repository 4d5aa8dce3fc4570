"""AES-GCM records on a persistent stream: the client end, and the format both ends share.

Every message on a sealed stream, in both directions, is one record of :mod:`._records` with
the session id left out of the wire form (the stream is bound to one channel session when it
opens, so the id is implied; it is put back before the record is opened, so the AAD, nonce,
replay window and rekeying are exactly those of the HTTP path)::

    offset  size  field
    0       1     version        0x01
    1       1     frame type     0x01 request (client -> server), 0x02 response (server -> client)
    2       4     epoch
    6       8     sequence
    14      n     ciphertext
    14+n    16    GCM tag

The first message is the sealed *opening*, ``OPENING_PREFIX || path || 0x00 || route key``:
the server accepts nothing else first, and only if path and route key equal the upgrade
request's (so a proxy routing on the clear-text key cannot be lied to). The server answers
the sealed ``OPEN_ACK``, which proves it holds the channel keys. After that, each request
record is answered by exactly one response record bound to its sequence number.
"""

from __future__ import annotations

from collections import deque

from secure_channel._base import Stream
from secure_channel._exceptions import AuthenticationError, InvalidRecord, TransportError
from secure_channel._records import HEADER, SESSION_ID_SIZE, ClientChannel

OPENING_PREFIX = b"lambda-split stream v1\x00"
OPEN_ACK = b"lambda-split stream open"
#: Header bytes on the stream: the record header without the 16-byte session id.
COMPACT_HEADER = HEADER.size - SESSION_ID_SIZE
_SID = slice(2, 2 + SESSION_ID_SIZE)


def _opening(path: str, route: str) -> bytes:
    """The plaintext of a stream's first record: binds the path and the routing key."""
    return OPENING_PREFIX + path.encode() + b"\x00" + route.encode()


def _compact(record: bytes) -> bytes:
    """The wire form of ``record`` on a stream: the session id removed."""
    return record[: _SID.start] + record[_SID.stop :]


def _expand(data: bytes, session_id: bytes) -> bytes:
    """The full record of a stream message, the stream's session id put back."""
    if len(data) < COMPACT_HEADER:
        raise InvalidRecord("record rejected")
    return data[: _SID.start] + session_id + data[_SID.start :]


class SealedStream(Stream):
    """A :class:`Stream` whose every message is an AES-GCM record of a dedicated channel session."""

    def __init__(self, inner: Stream, channel: ClientChannel, path: str, route: str) -> None:
        self.stats = inner.stats
        self.inner = inner
        self._channel = channel
        self._waiting: deque[int] = deque()
        self.send(_opening(path, route))
        if self.recv() != OPEN_ACK:
            raise AuthenticationError("the server did not acknowledge the sealed stream")

    def send(self, message: bytes) -> None:
        if self._channel.exhausted:
            raise TransportError("the stream's channel keys are used up; open a new stream")
        record, sequence = self._channel.seal_request(message)
        self.inner.send(_compact(record))
        self._waiting.append(sequence)

    def recv(self) -> bytes:
        if not self._waiting:
            raise TransportError("nothing was sent that the server could answer")
        data = self.inner.recv()
        return self._channel.open_response(_expand(data, self._channel.session_id), self._waiting.popleft())

    def close(self) -> None:
        self.inner.close()
