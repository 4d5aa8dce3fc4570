"""The record layer: known answers, tamper rejection, replay window, rekeying."""

from __future__ import annotations

import pytest
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from hypothesis import given, settings
from hypothesis import strategies as st

from secure_channel import (
    ChannelError,
    ClientChannel,
    InvalidRecord,
    RecordOpener,
    RecordSealer,
    ServerChannel,
)
from secure_channel._records import (
    DIR_C2S,
    FRAME_REQUEST,
    FRAME_RESPONSE,
    HEADER,
    MAX_EPOCH,
    OVERHEAD,
    _aead_open,
    _aead_seal,
    _next_key,
)

# McGrew & Viega, "The Galois/Counter Mode of Operation (GCM)", test cases 13-16 (AES-256),
# also the 96-bit-IV cases of NIST SP 800-38D's validation examples.
_P = (
    "d9313225f88406e5a55909c5aff5269a86a7a9531534f7da2e4c303d8a318a72"
    "1c3c0c95956809532fcf0e2449a6b525b16aedf5aa0de657ba637b39"
)
_C = (
    "522dc1f099567d07f47f37a32a84427d643a8cdcbfe5c0c97598a2bd2555d1aa"
    "8cb08e48590dbb3da7b08b1056828838c5f61e6393ba7a0abcc9f662"
)
_K = "feffe9928665731c6d6a8f9467308308" * 2
GCM_VECTORS = [
    ("00" * 32, "00" * 12, "", "", "", "530f8afbc74536b9a963b4f1c4cb738b"),
    (
        "00" * 32,
        "00" * 12,
        "00" * 16,
        "",
        "cea7403d4d606b6e074ec5d3baf39d18",
        "d0d1c8a799996bf0265b98b5d48ab919",
    ),
    (
        _K,
        "cafebabefacedbaddecaf888",
        _P + "1aafd255",
        "",
        _C + "898015ad",
        "b094dac5d93471bdec1a502270e3cc6c",
    ),
    (
        _K,
        "cafebabefacedbaddecaf888",
        _P,
        "feedfacedeadbeeffeedfacedeadbeefabaddad2",
        _C,
        "76fc6ece0f4e1768cddf8853bb2d551b",
    ),
]


@pytest.mark.parametrize(("key", "iv", "pt", "aad", "ct", "tag"), GCM_VECTORS)
def test_gcm_spec_vectors(key: str, iv: str, pt: str, aad: str, ct: str, tag: str) -> None:
    k, n, a = bytes.fromhex(key), bytes.fromhex(iv), bytes.fromhex(aad)
    assert _aead_seal(k, n, bytes.fromhex(pt), a).hex() == ct + tag
    assert _aead_open(k, n, bytes.fromhex(ct + tag), a).hex() == pt
    bad = bytearray.fromhex(ct + tag)
    bad[-1] ^= 1
    with pytest.raises(InvalidRecord):
        _aead_open(k, n, bytes(bad), a)


KEY = bytes(range(32))
SID = bytes(range(0xA0, 0xB0))
# Record format known answer: key 00..1f, session a0..af, first request, plaintext "hello".
RECORD_KAT = (
    "0101a0a1a2a3a4a5a6a7a8a9aaabacadaeaf000000000000000000000000"  # v1, request, sid, epoch 0, seq 0
    "2c53a1c663"  # ciphertext of "hello"
    "d0acd237ddb55f72e3ac166f0acd82a6"  # tag
)


def _sealer(**kwargs: object) -> RecordSealer:
    return RecordSealer(KEY, session_id=SID, direction=DIR_C2S, frame_type=FRAME_REQUEST, **kwargs)  # type: ignore[arg-type]


def _opener(**kwargs: object) -> RecordOpener:
    return RecordOpener(KEY, session_id=SID, direction=DIR_C2S, frame_type=FRAME_REQUEST, **kwargs)  # type: ignore[arg-type]


def test_record_known_answer() -> None:
    record, seq = _sealer().seal(b"hello")
    header = bytes.fromhex(RECORD_KAT[:60])
    nonce = bytes.fromhex("00000001" + "0000000000000000")
    expected_body = AESGCM(KEY).encrypt(nonce, b"hello", header + b"\x01")
    assert seq == 0
    assert record == header + expected_body
    assert record.hex() == RECORD_KAT
    assert _opener().open(record) == (b"hello", 0)


def test_header_layout() -> None:
    record, _ = _sealer().seal(b"")
    assert len(record) == OVERHEAD == HEADER.size + 16 == 46
    version, frame, sid, epoch, seq = HEADER.unpack(record[: HEADER.size])
    assert (version, frame, sid, epoch, seq) == (1, FRAME_REQUEST, SID, 0, 0)


@settings(max_examples=200, deadline=None)
@given(plaintext=st.binary(max_size=300), data=st.data())
def test_any_flipped_bit_is_rejected_and_leaves_no_trace(plaintext: bytes, data: st.DataObject) -> None:
    record, _ = _sealer().seal(plaintext)
    position = data.draw(st.integers(0, len(record) - 1), label="byte")
    bit = data.draw(st.integers(0, 7), label="bit")
    tampered = bytearray(record)
    tampered[position] ^= 1 << bit
    opener = _opener()
    with pytest.raises(InvalidRecord):
        opener.open(bytes(tampered))
    assert opener.open(record) == (plaintext, 0)  # the failure did not move the window


@settings(max_examples=100, deadline=None)
@given(plaintext=st.binary(max_size=100), cut=st.integers(1, 200))
def test_truncated_or_extended_records_are_rejected(plaintext: bytes, cut: int) -> None:
    record, _ = _sealer().seal(plaintext)
    for candidate in (record[: max(0, len(record) - cut)], record + bytes(cut)):
        with pytest.raises(InvalidRecord):
            _opener().open(candidate)


def test_wrong_frame_type_direction_session_or_bind() -> None:
    record, _ = _sealer().seal(b"x")
    for opener in (
        RecordOpener(KEY, session_id=SID, direction=DIR_C2S, frame_type=FRAME_RESPONSE),
        RecordOpener(KEY, session_id=SID, direction=2, frame_type=FRAME_REQUEST),
        RecordOpener(KEY, session_id=bytes(16), direction=DIR_C2S, frame_type=FRAME_REQUEST),
    ):
        with pytest.raises(InvalidRecord):
            opener.open(record)
    with pytest.raises(InvalidRecord):
        _opener().open(record, bind=b"\x00" * 8)


@settings(max_examples=100, deadline=None)
@given(order=st.permutations(list(range(20))), replays=st.lists(st.integers(0, 19), max_size=10))
def test_replays_always_fail_reorders_inside_the_window_pass(order: list[int], replays: list[int]) -> None:
    sealer, opener = _sealer(), _opener(window=64)
    records = [sealer.seal(bytes([i]))[0] for i in range(20)]
    for i in order:
        assert opener.open(records[i]) == (bytes([i]), i)
    for i in replays:
        with pytest.raises(InvalidRecord):
            opener.open(records[i])


def test_records_older_than_the_window_are_rejected() -> None:
    sealer, opener = _sealer(), _opener(window=8)
    records = [sealer.seal(b"m")[0] for i in range(20)]
    opener.open(records[19])
    opener.open(records[12])  # 7 behind: inside
    with pytest.raises(InvalidRecord):
        opener.open(records[11])  # 8 behind: outside


def test_rekey_after_messages_ratchets_keys_and_epochs() -> None:
    sealer, opener = _sealer(rekey_after_messages=3), _opener()
    epochs = []
    for i in range(10):
        record, _ = sealer.seal(b"%d" % i)
        epochs.append(HEADER.unpack(record[: HEADER.size])[3])
        assert opener.open(record)[0] == b"%d" % i
    assert epochs == [0, 0, 0, 1, 1, 1, 2, 2, 2, 3]
    assert _next_key(KEY) != KEY


def test_rekey_after_time() -> None:
    now = [0.0]
    sealer = RecordSealer(
        KEY,
        session_id=SID,
        direction=DIR_C2S,
        frame_type=FRAME_REQUEST,
        rekey_after_seconds=10,
        clock=lambda: now[0],
    )
    opener = _opener()
    r0, _ = sealer.seal(b"a")
    now[0] = 11.0
    r1, _ = sealer.seal(b"b")
    assert HEADER.unpack(r1[: HEADER.size])[3] == 1
    assert opener.open(r0)[0] == b"a" and opener.open(r1)[0] == b"b"


def test_receiver_refuses_epoch_jumps() -> None:
    sealer = _sealer(rekey_after_messages=1)
    records = [sealer.seal(b"x")[0] for _ in range(3)]  # epochs 0, 1, 2
    opener = _opener()
    with pytest.raises(InvalidRecord):
        opener.open(records[2])
    assert opener.open(records[0])[1] == 0


def test_hard_refusal_before_counters_wrap() -> None:
    sealer = _sealer(rekey_after_messages=1)
    sealer.seal(b"x")
    sealer._epoch = MAX_EPOCH  # as if 2**32 - 1 rekeys had happened
    assert sealer.exhausted
    with pytest.raises(ChannelError):
        sealer.seal(b"y")
    sealer = _sealer()
    sealer._next_sequence = (1 << 64) - 1
    with pytest.raises(ChannelError):
        sealer.seal(b"z")


def test_constructor_validation() -> None:
    with pytest.raises(ValueError):
        RecordSealer(b"short", session_id=SID, direction=1, frame_type=1)
    with pytest.raises(ValueError):
        _sealer(rekey_after_messages=0)
    with pytest.raises(ValueError):
        _sealer(rekey_after_messages=(1 << 32) + 1)
    with pytest.raises(ValueError):
        RecordOpener(KEY, session_id=b"x", direction=1, frame_type=1)


def test_channels_bind_responses_to_their_request() -> None:
    c2s, s2c = bytes(32), bytes([1]) * 32
    client, server = ClientChannel(SID, c2s, s2c), ServerChannel(SID, c2s, s2c)
    r1, q1 = client.seal_request(b"one")
    r2, q2 = client.seal_request(b"two")
    _, s1 = server.open_request(r1)
    _, s2 = server.open_request(r2)
    answer1 = server.seal_response(b"answer-one", s1)
    answer2 = server.seal_response(b"answer-two", s2)
    with pytest.raises(InvalidRecord):
        client.open_response(answer1, q2)  # a delayed response cannot answer a later request
    assert client.open_response(answer2, q2) == b"answer-two"
    assert client.open_response(answer1, q1) == b"answer-one"
    with pytest.raises(InvalidRecord):
        server.open_request(r1)  # replay
