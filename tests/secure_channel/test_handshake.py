"""The SIGMA-I handshake as pure state machines: who is accepted, what is refused."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.serialization import load_pem_private_key
from hypothesis import given, settings
from hypothesis import strategies as st

import secure_channel._handshake as handshake_module
from secure_channel import (
    AuthenticationError,
    ClientHandshake,
    Credentials,
    ServerHandshake,
    load_credentials,
)

from .conftest import PKI


def run(client: Credentials, server: Credentials, name: str = "localhost") -> tuple[tuple[bytes, ...], ...]:
    ch = ClientHandshake(client, name)
    sh = ServerHandshake(server, ch.start())
    msg3 = ch.process_msg2(sh.msg2)
    msg4, c2s, s2c, identity = sh.finish(msg3)
    assert identity == client.identity and ch.peer_identity == server.identity
    return ch.finish(msg4), (sh.session_id, c2s, s2c)


def test_both_sides_derive_the_same_distinct_keys(
    client_creds: Credentials, server_creds: Credentials
) -> None:
    client_side, server_side = run(client_creds, server_creds)
    assert client_side == server_side
    sid, c2s, s2c = client_side
    assert len(sid) == 16 and len(c2s) == len(s2c) == 32 and c2s != s2c


def _keys_are_fresh(client: Credentials, server: Credentials) -> bool:
    """Two handshakes with the same credentials: no traffic key in common (session ids aside)."""
    (_, c2s_a, s2c_a), _ = run(client, server)
    (_, c2s_b, s2c_b), _ = run(client, server)
    return len({c2s_a, s2c_a, c2s_b, s2c_b}) == 4


def test_every_handshake_derives_fresh_traffic_keys(
    client_creds: Credentials, server_creds: Credentials
) -> None:
    assert _keys_are_fresh(client_creds, server_creds)


def test_the_freshness_check_catches_constant_keys(
    client_creds: Credentials, server_creds: Credentials, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A test of the test: a build whose key derivation ignores the handshake must fail it.
    monkeypatch.setattr(handshake_module._Keys, "traffic", lambda self, th: (bytes(32), bytes(range(32))))
    assert not _keys_are_fresh(client_creds, server_creds)


def test_client_from_another_ca_is_refused(other_keys: Path, server_creds: Credentials) -> None:
    ch = ClientHandshake(load_credentials(other_keys, "client"), "localhost")
    sh = ServerHandshake(server_creds, ch.start())
    with pytest.raises(AuthenticationError, match="peer certificate rejected"):
        ch.process_msg2(sh.msg2)  # the client already refuses the server: it pins its own CA


def test_server_refuses_a_client_cert_from_another_ca(
    other_keys: Path, client_creds: Credentials, server_creds: Credentials, tmp_path: Path
) -> None:
    # A client that trusts our CA but presents a certificate from another CA.
    rogue = load_credentials(other_keys, "client")
    mixed = dataclasses.replace(rogue, ca_cert=client_creds.ca_cert)
    ch = ClientHandshake(mixed, "localhost")
    sh = ServerHandshake(server_creds, ch.start())
    msg3 = ch.process_msg2(sh.msg2)
    with pytest.raises(AuthenticationError, match="peer certificate rejected"):
        sh.finish(msg3)


def _with_cert(base: Credentials, directory: Path, stem: str) -> Credentials:
    """``base`` with its certificate and key swapped for ``directory/stem.{pem,key}``, unchecked."""
    cert = x509.load_pem_x509_certificate((directory / f"{stem}.pem").read_bytes())
    key = load_pem_private_key((directory / f"{stem}.key").read_bytes(), None)
    return dataclasses.replace(base, cert=cert, private_key=key)  # type: ignore[arg-type]


def test_certificates_with_the_wrong_role_are_refused(
    pki: PKI, tmp_path: Path, client_creds: Credentials, server_creds: Credentials
) -> None:
    d = pki.issue("client", "server", ["lambda-split-client"], directory=tmp_path / "c")  # serverAuth only
    ch = ClientHandshake(_with_cert(client_creds, d, "client"), "localhost")
    sh = ServerHandshake(server_creds, ch.start())
    with pytest.raises(AuthenticationError, match="EKU"):
        sh.finish(ch.process_msg2(sh.msg2))
    d = pki.issue("server", "client", ["localhost"], directory=tmp_path / "s")  # clientAuth only
    ch = ClientHandshake(client_creds, "localhost")
    with pytest.raises(AuthenticationError, match="EKU"):
        ch.process_msg2(ServerHandshake(_with_cert(server_creds, d, "server"), ch.start()).msg2)


def test_wrong_server_name_is_refused(client_creds: Credentials, server_creds: Credentials) -> None:
    ch = ClientHandshake(client_creds, "evil.example")
    with pytest.raises(AuthenticationError, match="subjectAltName"):
        ch.process_msg2(ServerHandshake(server_creds, ch.start()).msg2)


def test_replayed_msg3_is_refused(client_creds: Credentials, server_creds: Credentials) -> None:
    ch = ClientHandshake(client_creds, "localhost")
    sh = ServerHandshake(server_creds, ch.start())
    msg3 = ch.process_msg2(sh.msg2)
    sh.finish(msg3)
    with pytest.raises(AuthenticationError):
        sh.finish(msg3)
    # Replaying msg1 gives a fresh server state; the old msg3 does not complete it.
    again = ServerHandshake(server_creds, ch.start())
    forged = bytes(msg3[:2]) + again.session_id + msg3[18:]
    with pytest.raises(AuthenticationError):
        again.finish(forged)


def test_swapped_messages_between_sessions_are_refused(
    client_creds: Credentials, server_creds: Credentials
) -> None:
    a, b = ClientHandshake(client_creds, "localhost"), ClientHandshake(client_creds, "localhost")
    sa, sb = ServerHandshake(server_creds, a.start()), ServerHandshake(server_creds, b.start())
    with pytest.raises(AuthenticationError):
        a.process_msg2(sb.msg2)  # msg2 of another session
    msg3_b = b.process_msg2(sb.msg2)
    with pytest.raises(AuthenticationError):
        sa.finish(bytes(msg3_b[:2]) + sa.session_id + msg3_b[18:])
    for wrong in (a.start(), sa.msg2):  # msg1 or msg2 where msg3 belongs
        with pytest.raises(AuthenticationError):
            ServerHandshake(server_creds, b.start()).finish(wrong)
    with pytest.raises(AuthenticationError):
        ServerHandshake(server_creds, sa.msg2)  # msg2 where msg1 belongs


@settings(max_examples=60, deadline=None)
@given(which=st.sampled_from(["msg2", "msg3", "msg4"]), where=st.integers(0, 1 << 20), bit=st.integers(0, 7))
def test_any_flipped_bit_in_the_handshake_fails(
    client_creds: Credentials, server_creds: Credentials, which: str, where: int, bit: int
) -> None:
    ch = ClientHandshake(client_creds, "localhost")
    sh = ServerHandshake(server_creds, ch.start())

    def flip(message: bytes) -> bytes:
        out = bytearray(message)
        out[where % len(out)] ^= 1 << bit
        return bytes(out)

    with pytest.raises(AuthenticationError):
        if which == "msg2":
            ch.process_msg2(flip(sh.msg2))
        msg3 = ch.process_msg2(sh.msg2)
        if which == "msg3":
            sh.finish(flip(msg3))
        msg4 = sh.finish(msg3)[0]
        ch.finish(flip(msg4))


def test_size_limits(client_creds: Credentials, server_creds: Credentials) -> None:
    ch = ClientHandshake(client_creds, "localhost")
    with pytest.raises(AuthenticationError):
        ServerHandshake(server_creds, ch.start() + b"x")
    with pytest.raises(AuthenticationError):
        ch.process_msg2(b"\x01\x02" + bytes(10_000))
