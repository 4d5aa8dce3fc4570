"""The AES-256-GCM record layer: a recipe, so callers never see a key schedule or a nonce.

Record format (all integers big-endian)::

    offset  size  field
    0       1     version        0x01
    1       1     frame type     0x01 request (client -> server), 0x02 response (server -> client)
    2       16    session id     chosen by the server during the handshake
    18      4     epoch          key generation; the key of epoch n+1 is HKDF-Expand(key_n, "rekey")
    22      8     sequence       per direction, starts at 0, never reused, continues across epochs
    30      n     ciphertext
    30+n    16    GCM tag

    nonce = 00 00 00 || direction || sequence           (12 bytes, never random)
    aad   = header (bytes 0..29) || direction || bind   (bind = request sequence, responses only)

Each direction has its own key. ``direction`` is 0x01 client->server and 0x02
server->client. A response binds the sequence number of the request it answers, so a
delayed response cannot be passed off as the answer to a later request.

The receiver keeps an RFC 4303 style sliding window (64 records) and updates it, and
any epoch change, only after the tag verifies. A sequence more than ``MAX_SEQUENCE_JUMP``
ahead of the highest seen is refused before the tag is checked. Every failure raises the single opaque
:class:`InvalidRecord`.
"""

from __future__ import annotations

import struct
import time
from collections.abc import Callable

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDFExpand

from secure_channel._exceptions import ChannelError, InvalidRecord

RECORD_VERSION = 1
FRAME_REQUEST = 1
FRAME_RESPONSE = 2
DIR_C2S = 1
DIR_S2C = 2
HEADER = struct.Struct(">BB16sIQ")
TAG_SIZE = 16
OVERHEAD = HEADER.size + TAG_SIZE
SESSION_ID_SIZE = 16
KEY_SIZE = 32
WINDOW_SIZE = 64
#: The furthest a record's sequence may run ahead of the highest one seen. An honest peer only
#: skips the records it sealed but never delivered; a larger jump is refused before the tag check.
MAX_SEQUENCE_JUMP = 1 << 16
MAX_PLAINTEXT = 1 << 30
MAX_SEQUENCE = (1 << 64) - 1
MAX_EPOCH = (1 << 32) - 1
#: Hard cap on records under one key; counter nonces make 2**32 comfortably safe for GCM.
HARD_MESSAGES_PER_KEY = 1 << 32
DEFAULT_REKEY_MESSAGES = 1 << 20
DEFAULT_REKEY_SECONDS = 3600.0


def _aead_seal(key: bytes, nonce: bytes, plaintext: bytes, aad: bytes) -> bytes:
    """Fixed-input hook for known-answer tests: AES-GCM ``ciphertext || tag``."""
    return AESGCM(key).encrypt(nonce, plaintext, aad)


def _aead_open(key: bytes, nonce: bytes, data: bytes, aad: bytes) -> bytes:
    try:
        return AESGCM(key).decrypt(nonce, data, aad)
    except InvalidTag:
        raise InvalidRecord("record rejected") from None


def _nonce(direction: int, sequence: int) -> bytes:
    return bytes((0, 0, 0, direction)) + sequence.to_bytes(8, "big")


def _aad(header: bytes, direction: int, bind: bytes) -> bytes:
    return header + bytes((direction,)) + bind


def _next_key(key: bytes) -> bytes:
    """The HKDF ratchet: the key of the next epoch. The old key cannot be recovered from it."""
    return HKDFExpand(hashes.SHA256(), KEY_SIZE, b"lambda-split v1 rekey").derive(key)


def _check_key(key: bytes, session_id: bytes) -> None:
    if not isinstance(key, bytes) or len(key) != KEY_SIZE:
        raise ValueError("key must be 32 bytes")
    if not isinstance(session_id, bytes) or len(session_id) != SESSION_ID_SIZE:
        raise ValueError("session_id must be 16 bytes")


class ReplayWindow:
    """Sliding anti-replay window over sequence numbers (RFC 4303 §3.4.3, bitmap of ``size`` bits)."""

    def __init__(self, size: int = WINDOW_SIZE) -> None:
        if size < 1:
            raise ValueError("window size must be positive")
        self.size = size
        self.highest = -1
        self._bitmap = 0  # bit i set <=> sequence (highest - i) was accepted

    def acceptable(self, sequence: int) -> bool:
        if sequence > self.highest:
            return sequence - self.highest <= MAX_SEQUENCE_JUMP
        offset = self.highest - sequence
        return offset < self.size and not (self._bitmap >> offset) & 1

    def mark(self, sequence: int) -> None:
        """Record ``sequence`` as seen. Call only after the record authenticated."""
        if sequence > self.highest:
            shift = sequence - self.highest
            # never shift by more than the window: the cost stays bounded whatever the jump
            kept = self._bitmap << shift if shift < self.size else 0
            self._bitmap = (kept | 1) & ((1 << self.size) - 1)
            self.highest = sequence
        else:
            self._bitmap |= 1 << (self.highest - sequence)


class RecordSealer:
    """Seals records in one direction, choosing nonces and rekeying by itself."""

    def __init__(
        self,
        key: bytes,
        *,
        session_id: bytes,
        direction: int,
        frame_type: int,
        rekey_after_messages: int = DEFAULT_REKEY_MESSAGES,
        rekey_after_seconds: float = DEFAULT_REKEY_SECONDS,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        _check_key(key, session_id)
        if not 1 <= rekey_after_messages <= HARD_MESSAGES_PER_KEY:
            raise ValueError(f"rekey_after_messages must be in [1, {HARD_MESSAGES_PER_KEY}]")
        if not rekey_after_seconds > 0:
            raise ValueError("rekey_after_seconds must be positive")
        self._key = key
        self._session_id = session_id
        self._direction = direction
        self._frame_type = frame_type
        self._rekey_messages = rekey_after_messages
        self._rekey_seconds = rekey_after_seconds
        self._clock = clock
        self._epoch = 0
        self._epoch_start = clock()
        self._in_epoch = 0
        self._next_sequence = 0

    @property
    def epoch(self) -> int:
        return self._epoch

    @property
    def exhausted(self) -> bool:
        """True once no further record can be sealed safely; start a new session."""
        if self._next_sequence >= MAX_SEQUENCE or self._in_epoch >= HARD_MESSAGES_PER_KEY:
            return True
        return self._epoch >= MAX_EPOCH and self._due()

    def _due(self) -> bool:
        elapsed = self._clock() - self._epoch_start
        return self._in_epoch >= self._rekey_messages or elapsed >= self._rekey_seconds

    def seal(self, plaintext: bytes, *, bind: bytes = b"") -> tuple[bytes, int]:
        """Return ``(record, sequence)``. Raises ChannelError if the session is exhausted."""
        if len(plaintext) > MAX_PLAINTEXT:
            raise ValueError("plaintext too large for one record")
        if self.exhausted:
            raise ChannelError("record counters exhausted; a new session is required")
        if self._due():
            self._key = _next_key(self._key)
            self._epoch += 1
            self._epoch_start = self._clock()
            self._in_epoch = 0
        sequence = self._next_sequence
        self._next_sequence += 1
        self._in_epoch += 1
        header = HEADER.pack(RECORD_VERSION, self._frame_type, self._session_id, self._epoch, sequence)
        body = _aead_seal(
            self._key, _nonce(self._direction, sequence), plaintext, _aad(header, self._direction, bind)
        )
        return header + body, sequence


class RecordOpener:
    """Opens records from one direction: checks header, tag and replay window, in that order."""

    def __init__(
        self, key: bytes, *, session_id: bytes, direction: int, frame_type: int, window: int = WINDOW_SIZE
    ) -> None:
        _check_key(key, session_id)
        self._keys: dict[int, bytes] = {0: key}
        self._epoch = 0
        self._session_id = session_id
        self._direction = direction
        self._frame_type = frame_type
        self._window = ReplayWindow(window)

    @property
    def expected(self) -> tuple[int, int]:
        """``(epoch, sequence)`` of the next record in order: the current epoch, and one past the
        highest sequence accepted (0 before any). Read-only; on an ordered stream the receiver
        implies both instead of reading them (:mod:`secure_channel._sealed_stream`)."""
        return self._epoch, self._window.highest + 1

    def _key_for(self, epoch: int) -> bytes | None:
        if epoch == self._epoch + 1:
            return _next_key(self._keys[self._epoch])
        return self._keys.get(epoch)

    def open(self, record: bytes, *, bind: bytes = b"") -> tuple[bytes, int]:
        """Return ``(plaintext, sequence)`` or raise InvalidRecord; state changes only on success."""
        if len(record) < OVERHEAD or len(record) > MAX_PLAINTEXT + OVERHEAD:
            raise InvalidRecord("record rejected")
        header = record[: HEADER.size]
        version, frame_type, session_id, epoch, sequence = HEADER.unpack(header)
        key = self._key_for(epoch)
        if (
            version != RECORD_VERSION
            or frame_type != self._frame_type
            or session_id != self._session_id
            or key is None
            or not self._window.acceptable(sequence)
        ):
            raise InvalidRecord("record rejected")
        aad = _aad(header, self._direction, bind)
        plaintext = _aead_open(key, _nonce(self._direction, sequence), record[HEADER.size :], aad)
        self._window.mark(sequence)
        if epoch == self._epoch + 1:
            self._keys = {self._epoch: self._keys[self._epoch], epoch: key}
            self._epoch = epoch
        return plaintext, sequence


class ClientChannel:
    """The client end of an established session: seal requests, open the matching responses."""

    def __init__(
        self,
        session_id: bytes,
        c2s_key: bytes,
        s2c_key: bytes,
        *,
        rekey_after_messages: int = DEFAULT_REKEY_MESSAGES,
        rekey_after_seconds: float = DEFAULT_REKEY_SECONDS,
    ) -> None:
        self.session_id = session_id
        #: The routing key the handshake bound (set by the transport that ran it).
        self.route = ""
        self._sealer = RecordSealer(
            c2s_key,
            session_id=session_id,
            direction=DIR_C2S,
            frame_type=FRAME_REQUEST,
            rekey_after_messages=rekey_after_messages,
            rekey_after_seconds=rekey_after_seconds,
        )
        self._opener = RecordOpener(
            s2c_key, session_id=session_id, direction=DIR_S2C, frame_type=FRAME_RESPONSE
        )

    @property
    def exhausted(self) -> bool:
        return self._sealer.exhausted

    @property
    def expected_response(self) -> tuple[int, int]:
        """``(epoch, sequence)`` of the next response in order (:attr:`RecordOpener.expected`)."""
        return self._opener.expected

    def seal_request(self, plaintext: bytes) -> tuple[bytes, int]:
        return self._sealer.seal(plaintext)

    def open_response(self, record: bytes, request_sequence: int) -> bytes:
        return self._opener.open(record, bind=request_sequence.to_bytes(8, "big"))[0]


class ServerChannel:
    """The server end of an established session: open requests, seal the responses."""

    def __init__(
        self,
        session_id: bytes,
        c2s_key: bytes,
        s2c_key: bytes,
        *,
        rekey_after_messages: int = DEFAULT_REKEY_MESSAGES,
        rekey_after_seconds: float = DEFAULT_REKEY_SECONDS,
    ) -> None:
        self.session_id = session_id
        self._opener = RecordOpener(
            c2s_key, session_id=session_id, direction=DIR_C2S, frame_type=FRAME_REQUEST
        )
        self._sealer = RecordSealer(
            s2c_key,
            session_id=session_id,
            direction=DIR_S2C,
            frame_type=FRAME_RESPONSE,
            rekey_after_messages=rekey_after_messages,
            rekey_after_seconds=rekey_after_seconds,
        )

    @property
    def exhausted(self) -> bool:
        return self._sealer.exhausted

    @property
    def expected_request(self) -> tuple[int, int]:
        """``(epoch, sequence)`` of the next request in order (:attr:`RecordOpener.expected`)."""
        return self._opener.expected

    def open_request(self, record: bytes) -> tuple[bytes, int]:
        return self._opener.open(record)

    def seal_response(self, plaintext: bytes, request_sequence: int) -> bytes:
        return self._sealer.seal(plaintext, bind=request_sequence.to_bytes(8, "big"))[0]
