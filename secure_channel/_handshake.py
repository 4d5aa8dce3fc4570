"""SIGMA-I style authenticated key exchange for the AES-GCM channel (pure state machines, no I/O).

Frames (``v`` = 0x01, integers big-endian, ``H`` = SHA-256, ``||`` = concatenation)::

    msg1  C->S  v 01 | eC (32, X25519) | nC (32)                                       66 bytes
    msg2  S->C  v 02 | sid (16) | eS (32) | nS (32) | AEAD(kSh, payload(certS, sigS, macS))
    msg3  C->S  v 03 | sid (16) | AEAD(kCh, payload(certC, sigC, macC))
    msg4  S->C  v 04 | sid (16) | HMAC(kSf, "server confirm" || H(msg1||msg2||msg3))   50 bytes

    payload = u16 len | cert DER (<= 4096) | u16 len | ECDSA-P256-SHA256 DER sig (<= 80) | mac (32)

Key schedule: ``prk = HKDF-Extract(salt = nC || nS, ikm = X25519(e, E'))``, then every
key is ``HKDF-Expand(prk, label || th, 32)`` with ``th = H(msg1 || msg2 header)`` for the
handshake keys (``kSh``, ``kCh``, ``kSf``, ``kCf``) and ``th = H(msg1 || msg2 || msg3)`` for
the traffic keys (``c2s``, ``s2c``). When the client names a routing key ``r`` (the clear-text
``x-lambda-route`` a reverse proxy hashes on), every transcript above starts with
``"lambda-split v1 route" || 0x00 || u16 len(r) || r`` before ``msg1``: a server that saw another
key (a proxy rewrote it, or moved the handshake) derives other keys and its msg2 fails to open,
and the channel's keys belong to that key alone. With no key the transcripts are unchanged.
The handshake payloads are encrypted under single-use
keys (all-zero nonce) so certificates, and thus identities, stay hidden from passive observers.

    sigS = Sign(skS, "lambda-split v1 server sig" || H(msg1 || msg2 header || certS))
    macS = HMAC(kSf, H(msg1 || msg2 header || certS || sigS))
    sigC = Sign(skC, "lambda-split v1 client sig" || H(msg1 || msg2 || msg3 header || certC))
    macC = HMAC(kCf, H(msg1 || msg2 || msg3 header || certC || sigC))
"""

from __future__ import annotations

import datetime as dt
import hashlib
import hmac
import ipaddress
import os
import re
import struct

from cryptography import x509
from cryptography.exceptions import InvalidSignature, InvalidTag
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, x25519
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF, HKDFExpand
from cryptography.x509 import verification as xv
from cryptography.x509.oid import ExtendedKeyUsageOID

from secure_channel._exceptions import AuthenticationError
from secure_channel._keys import Credentials, cert_identity
from secure_channel._records import KEY_SIZE, SESSION_ID_SIZE

HS_VERSION = 1
MSG1, MSG2, MSG3, MSG4 = 1, 2, 3, 4
MAX_CERT = 4096
MAX_SIG = 80
MSG1_SIZE = 2 + 32 + 32
MSG2_HEADER_SIZE = 2 + SESSION_ID_SIZE + 32 + 32
MSG3_HEADER_SIZE = 2 + SESSION_ID_SIZE
MSG4_SIZE = 2 + SESSION_ID_SIZE + 32
MAX_MESSAGE = MSG2_HEADER_SIZE + 2 + MAX_CERT + 2 + MAX_SIG + 32 + 16
_ZERO_NONCE = bytes(12)
_PUBLIC_RAW = serialization.Encoding.Raw, serialization.PublicFormat.Raw
MAX_ROUTE = 128
_ROUTE = re.compile(r"[0-9A-Za-z_-]*")


def _route_context(route: str) -> bytes:
    """The transcript prefix that binds the routing key ``route`` ("" binds nothing).

    Raises ValueError for a key that is not 0-128 characters of ``[0-9A-Za-z_-]``.
    """
    if not isinstance(route, str) or len(route) > MAX_ROUTE or not _ROUTE.fullmatch(route):
        raise ValueError("a routing key is at most 128 characters of [0-9A-Za-z_-]")
    if not route:
        return b""
    return b"lambda-split v1 route\x00" + struct.pack(">H", len(route)) + route.encode("ascii")


def _h(*parts: bytes) -> bytes:
    return hashlib.sha256(b"".join(parts)).digest()


def _expand(prk: bytes, label: bytes, th: bytes) -> bytes:
    return HKDFExpand(hashes.SHA256(), KEY_SIZE, b"lambda-split v1 " + label + th).derive(prk)


def _fail(reason: str) -> AuthenticationError:
    return AuthenticationError(f"handshake failed: {reason}")


def _pack_payload(creds: Credentials, sig_context: bytes, mac_key: bytes, prefix: bytes) -> bytes:
    cert = creds.cert_der
    sig = creds.private_key.sign(sig_context + _h(prefix, cert), ec.ECDSA(hashes.SHA256()))
    mac = hmac.digest(mac_key, _h(prefix, cert, sig), "sha256")
    return struct.pack(">H", len(cert)) + cert + struct.pack(">H", len(sig)) + sig + mac


def _unpack_payload(payload: bytes) -> tuple[bytes, bytes, bytes]:
    if len(payload) < 2:
        raise _fail("truncated payload")
    (cert_len,) = struct.unpack_from(">H", payload)
    if not 0 < cert_len <= MAX_CERT or len(payload) < 4 + cert_len:
        raise _fail("bad certificate length")
    cert = payload[2 : 2 + cert_len]
    (sig_len,) = struct.unpack_from(">H", payload, 2 + cert_len)
    rest = payload[4 + cert_len :]
    if not 0 < sig_len <= MAX_SIG or len(rest) != sig_len + 32:
        raise _fail("bad signature length")
    return cert, rest[:sig_len], rest[sig_len:]


def _verify_peer(
    creds: Credentials,
    cert_der: bytes,
    sig: bytes,
    sig_context: bytes,
    prefix: bytes,
    *,
    server_name: str | None,
) -> x509.Certificate:
    """Chain to the pinned CA, check validity and EKU (and SAN for servers), then the signature."""
    try:
        cert = x509.load_der_x509_certificate(cert_der)
    except ValueError as exc:
        raise _fail("malformed peer certificate") from exc
    builder = xv.PolicyBuilder().store(xv.Store([creds.ca_cert])).time(dt.datetime.now(dt.UTC))
    try:
        if server_name is None:
            builder.build_client_verifier().verify(cert, [])
        else:
            subject: xv.Subject
            try:
                subject = x509.IPAddress(ipaddress.ip_address(server_name))
            except ValueError:
                subject = x509.DNSName(server_name)
            builder.max_chain_depth(0).build_server_verifier(subject).verify(cert, [])
    except (xv.VerificationError, ValueError) as exc:
        raise _fail(f"peer certificate rejected ({exc})") from exc
    role_oid = ExtendedKeyUsageOID.CLIENT_AUTH if server_name is None else ExtendedKeyUsageOID.SERVER_AUTH
    try:
        eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    except x509.ExtensionNotFound:
        raise _fail("peer certificate rejected (no EKU)") from None
    if role_oid not in eku:
        raise _fail("peer certificate rejected (wrong EKU)")
    public = cert.public_key()
    if not isinstance(public, ec.EllipticCurvePublicKey):
        raise _fail("peer key is not ECDSA")
    try:
        public.verify(sig, sig_context + _h(prefix, cert_der), ec.ECDSA(hashes.SHA256()))
    except InvalidSignature as exc:
        raise _fail("bad peer signature") from exc
    return cert


def _seal(key: bytes, plaintext: bytes, aad: bytes) -> bytes:
    return AESGCM(key).encrypt(_ZERO_NONCE, plaintext, aad)


def _open(key: bytes, data: bytes, aad: bytes) -> bytes:
    try:
        return AESGCM(key).decrypt(_ZERO_NONCE, data, aad)
    except InvalidTag:
        raise _fail("handshake message did not authenticate") from None


def _dh(private: x25519.X25519PrivateKey, peer_raw: bytes) -> bytes:
    try:
        return private.exchange(x25519.X25519PublicKey.from_public_bytes(peer_raw))
    except ValueError as exc:  # low-order point: all-zero shared secret
        raise _fail("bad ephemeral key") from exc


class _Keys:
    def __init__(self, shared: bytes, n_c: bytes, n_s: bytes, th2: bytes) -> None:
        self.prk = HKDF.extract(hashes.SHA256(), n_c + n_s, shared)
        self.server_hs = _expand(self.prk, b"s hs key", th2)
        self.client_hs = _expand(self.prk, b"c hs key", th2)
        self.server_fin = _expand(self.prk, b"s finished", th2)
        self.client_fin = _expand(self.prk, b"c finished", th2)

    def traffic(self, th_final: bytes) -> tuple[bytes, bytes]:
        return _expand(self.prk, b"c2s traffic", th_final), _expand(self.prk, b"s2c traffic", th_final)

    def confirm(self, th_final: bytes) -> bytes:
        return hmac.digest(self.server_fin, b"server confirm" + th_final, "sha256")


SERVER_SIG = b"lambda-split v1 server sig"
CLIENT_SIG = b"lambda-split v1 client sig"


class ClientHandshake:
    """Client side: ``start() -> msg1``, ``process_msg2(msg2) -> msg3``, ``finish(msg4) -> keys``.

    ``route`` is the routing key the requests carry in the clear; it is bound into the transcript.
    """

    def __init__(self, credentials: Credentials, server_name: str, *, route: str = "") -> None:
        if credentials.role != "client":
            raise ValueError("ClientHandshake needs client credentials")
        self._context = _route_context(route)
        self.route = route
        self._creds = credentials
        self._server_name = server_name
        self._eph = x25519.X25519PrivateKey.generate()
        self._nonce = os.urandom(32)
        self._msg1 = (
            bytes((HS_VERSION, MSG1)) + self._eph.public_key().public_bytes(*_PUBLIC_RAW) + self._nonce
        )
        self._keys: _Keys | None = None
        self._used = False
        self._finished = False
        self._th_final = b""
        self.session_id = b""
        self.peer_identity = ""

    def start(self) -> bytes:
        return self._msg1

    def process_msg2(self, msg2: bytes) -> bytes:
        if self._used:
            raise _fail("msg2 already processed; a handshake is single-use")
        self._used = True
        if (
            len(msg2) > MAX_MESSAGE
            or len(msg2) < MSG2_HEADER_SIZE + 16
            or msg2[:2] != bytes((HS_VERSION, MSG2))
        ):
            raise _fail("malformed msg2")
        header = msg2[:MSG2_HEADER_SIZE]
        sid, e_s, n_s = header[2:18], header[18:50], header[50:82]
        t1 = self._context + self._msg1
        keys = _Keys(_dh(self._eph, e_s), self._nonce, n_s, _h(t1, header))
        cert, sig, mac = _unpack_payload(_open(keys.server_hs, msg2[MSG2_HEADER_SIZE:], header))
        prefix = t1 + header
        _verify_peer(self._creds, cert, sig, SERVER_SIG, prefix, server_name=self._server_name)
        if not hmac.compare_digest(mac, hmac.digest(keys.server_fin, _h(prefix, cert, sig), "sha256")):
            raise _fail("bad server finished MAC")
        header3 = bytes((HS_VERSION, MSG3)) + sid
        prefix3 = t1 + msg2 + header3
        payload = _pack_payload(self._creds, CLIENT_SIG, keys.client_fin, prefix3)
        msg3 = header3 + _seal(keys.client_hs, payload, header3)
        self._keys, self.session_id, self.peer_identity = keys, sid, cert_identity(cert)
        self._th_final = _h(t1, msg2, msg3)
        return msg3

    def finish(self, msg4: bytes) -> tuple[bytes, bytes, bytes]:
        """Check the server's confirmation; return ``(session_id, c2s_key, s2c_key)``."""
        if self._keys is None:
            raise _fail("msg4 before msg2")
        if self._finished:
            raise _fail("handshake already finished")
        self._finished = True
        expected = bytes((HS_VERSION, MSG4)) + self.session_id + self._keys.confirm(self._th_final)
        if len(msg4) != MSG4_SIZE or not hmac.compare_digest(msg4, expected):
            raise _fail("bad server confirmation")
        return (self.session_id, *self._keys.traffic(self._th_final))


class ServerHandshake:
    """Server side of one handshake: build it from msg1, send ``.msg2``, then ``finish(msg3)``.

    ``route`` is the routing key msg1 arrived with; it is bound into the transcript.
    """

    def __init__(self, credentials: Credentials, msg1: bytes, *, route: str = "") -> None:
        if credentials.role != "server":
            raise ValueError("ServerHandshake needs server credentials")
        if len(msg1) != MSG1_SIZE or msg1[:2] != bytes((HS_VERSION, MSG1)):
            raise _fail("malformed msg1")
        t1 = _route_context(route) + msg1
        self.route = route
        eph = x25519.X25519PrivateKey.generate()
        self.session_id = os.urandom(SESSION_ID_SIZE)
        n_s = os.urandom(32)
        header = (
            bytes((HS_VERSION, MSG2)) + self.session_id + eph.public_key().public_bytes(*_PUBLIC_RAW) + n_s
        )
        self._creds = credentials
        self._keys = _Keys(_dh(eph, msg1[2:34]), msg1[34:66], n_s, _h(t1, header))
        payload = _pack_payload(credentials, SERVER_SIG, self._keys.server_fin, t1 + header)
        self.msg2 = header + _seal(self._keys.server_hs, payload, header)
        self._prefix = t1 + self.msg2
        self._done = False
        self.peer_cert: x509.Certificate | None = None

    def finish(self, msg3: bytes) -> tuple[bytes, bytes, bytes, str]:
        """Verify msg3; return ``(msg4, c2s_key, s2c_key, peer_identity)``.

        Succeeds at most once; a msg3 that fails leaves the handshake open for the real one.
        The verified client certificate is then in :attr:`peer_cert`.
        """
        if self._done:
            raise _fail("handshake already finished")
        header3 = bytes((HS_VERSION, MSG3)) + self.session_id
        if len(msg3) > MAX_MESSAGE or len(msg3) < MSG3_HEADER_SIZE + 16 or msg3[:MSG3_HEADER_SIZE] != header3:
            raise _fail("malformed msg3")
        cert, sig, mac = _unpack_payload(_open(self._keys.client_hs, msg3[MSG3_HEADER_SIZE:], header3))
        prefix = self._prefix + header3
        peer = _verify_peer(self._creds, cert, sig, CLIENT_SIG, prefix, server_name=None)
        if not hmac.compare_digest(mac, hmac.digest(self._keys.client_fin, _h(prefix, cert, sig), "sha256")):
            raise _fail("bad client finished MAC")
        self._done, self.peer_cert = True, peer
        th_final = _h(self._prefix, msg3)
        msg4 = bytes((HS_VERSION, MSG4)) + self.session_id + self._keys.confirm(th_final)
        return (msg4, *self._keys.traffic(th_final), cert_identity(cert))
