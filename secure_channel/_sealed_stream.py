"""AES-GCM records on a persistent stream: the client end, and the format both ends share.

Every message on a sealed stream, in both directions, is one record of :mod:`._records` of the
stream's own channel session, reduced to what the receiver cannot work out for itself::

    offset  size  field
    0       1     epoch_low      the record's epoch mod 256
    1       n     ciphertext
    1+n     16    GCM tag

The stream is ordered and reliable and its channel session belongs to it alone, so the rest of
the record header is implied: version 0x01; frame type 0x01 request (client -> server) or 0x02
response (server -> client), by direction; the stream's session id; the sequence the receiver
expects next (one past the highest it accepted, 0 at the start); and the epoch, which is the
receiver's current one if ``epoch_low`` matches it, else the next one if ``epoch_low`` matches
that, else the message is refused before its tag is checked. The receiver rebuilds the full
header (:func:`_expand`) and opens the record with the unchanged :class:`RecordOpener`, so the
nonce, the AAD (the full header, the direction and, for a response, the request it answers),
the replay window and rekeying are exactly those of the HTTP path.

A replayed, reordered, dropped or duplicated message is opened under a sequence it was not
sealed with: its tag fails and the stream ends. So each end sends a record as soon as it is
sealed, and stops sending (the stream is closed) once one was sealed and not sent
(:class:`_InStep`). An old-format (v1) message fails the same way, and its peer is closed with
a reason.

The first message is the sealed *opening*, ``OPENING_PREFIX || path || 0x00 || route key``:
the server accepts nothing else first, and only if path and route key equal the upgrade
request's (so a proxy routing on the clear-text key cannot be lied to). The server answers
the sealed ``OPEN_ACK``, which proves it holds the channel keys. After that, each request
record is answered by exactly one response record bound to its sequence number.
"""

from __future__ import annotations

from collections import deque

from secure_channel._base import Stream
from secure_channel._exceptions import AuthenticationError, ChannelError, InvalidRecord, TransportError
from secure_channel._records import (
    FRAME_RESPONSE,
    HEADER,
    MAX_EPOCH,
    RECORD_VERSION,
    TAG_SIZE,
    ClientChannel,
)

OPENING_PREFIX = b"lambda-split stream v2\x00"
OPEN_ACK = b"lambda-split stream open"
#: Header bytes of a stream message: the low byte of its record's epoch.
COMPACT_HEADER = 1
#: Bytes a sealed stream message adds to its plaintext: the epoch byte and the GCM tag.
STREAM_OVERHEAD = COMPACT_HEADER + TAG_SIZE


def _opening(path: str, route: str) -> bytes:
    """The plaintext of a stream's first record: binds the path and the routing key."""
    return OPENING_PREFIX + path.encode() + b"\x00" + route.encode()


def _compact(record: bytes) -> bytes:
    """The wire form of the full ``record`` on a stream: its epoch's low byte, ciphertext and tag."""
    epoch = HEADER.unpack_from(record)[3]
    return bytes((epoch & 0xFF,)) + record[HEADER.size :]


def _expand(data: bytes, frame_type: int, session_id: bytes, expected: tuple[int, int]) -> bytes:
    """The full record a stream message stands for, given the receiver's ``expected``
    ``(epoch, sequence)`` (:attr:`RecordOpener.expected`). InvalidRecord if it is too short or its
    epoch byte is neither the expected epoch's nor the next one's."""
    epoch, sequence = expected
    if len(data) < STREAM_OVERHEAD:
        raise InvalidRecord("record rejected")
    if data[0] != epoch & 0xFF:
        epoch += 1  # the sender rekeyed with this record
        if data[0] != epoch & 0xFF or epoch > MAX_EPOCH:
            raise InvalidRecord("record rejected")
    return HEADER.pack(RECORD_VERSION, frame_type, session_id, epoch, sequence) + data[COMPACT_HEADER:]


class _InStep:
    """One direction of a stream as its sender sees it: the wire form of each record, refused
    (ChannelError) for a record sealed out of step, that is, whose sequence is not one past the
    last one sent, since the receiver would open it under another sequence."""

    def __init__(self) -> None:
        self._next: int | None = None

    def compact(self, record: bytes) -> bytes:
        sequence = HEADER.unpack_from(record)[4]
        if self._next is not None and sequence != self._next:
            raise ChannelError("a record was sealed and not sent on this stream; it is out of step")
        self._next = sequence + 1
        return _compact(record)


class SealedStream(Stream):
    """A :class:`Stream` whose every message is an AES-GCM record of a dedicated channel session.

    ``channel`` must be fresh and used by nothing else (:meth:`AESGCMTransport.open_stream` runs
    a handshake for each stream). A message that does not authenticate, or a send that breaks
    off after its record was sealed, closes the stream: the sequences would be out of step.
    """

    def __init__(self, inner: Stream, channel: ClientChannel, path: str, route: str) -> None:
        self.stats = inner.stats
        self.inner = inner
        self._channel = channel
        self._sent = _InStep()
        self._waiting: deque[int] = deque()
        self._broken = False
        self.send(_opening(path, route))
        if self.recv() != OPEN_ACK:
            raise AuthenticationError("the server did not acknowledge the sealed stream")

    def _break(self) -> None:
        self._broken = True
        self.inner.close()

    def send(self, message: bytes) -> None:
        if self._broken:
            raise TransportError("the sealed stream is out of step and closed; open a new stream")
        if self._channel.exhausted:
            raise TransportError("the stream's channel keys are used up; open a new stream")
        record, sequence = self._channel.seal_request(message)
        try:
            self.inner.send(self._sent.compact(record))
        except BaseException:
            self._break()
            raise
        self._waiting.append(sequence)

    def recv(self) -> bytes:
        if self._broken:
            raise TransportError("the sealed stream is out of step and closed; open a new stream")
        if not self._waiting:
            raise TransportError("nothing was sent that the server could answer")
        data = self.inner.recv()
        channel = self._channel
        try:
            record = _expand(data, FRAME_RESPONSE, channel.session_id, channel.expected_response)
            plaintext = channel.open_response(record, self._waiting[0])
        except InvalidRecord:
            self._break()
            raise
        self._waiting.popleft()
        return plaintext

    def close(self) -> None:
        self.inner.close()
