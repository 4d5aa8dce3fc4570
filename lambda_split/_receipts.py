"""Signed step receipts: the server signs a hash chain over every step of a session.

A client opts in when it opens a session (``{"wire": ..., "receipts": true}``, over HTTP or the
stream). The server then answers with its certificate (PEM, issued by the deployment's CA for
``serverAuth``) and appends to each result frame a U8 tensor ``receipt``: the DER ECDSA P-256
(SHA-256) signature of the chain value after that step::

    h_0 = SHA256("lambda-split/receipts/v1\\0" || canonical JSON of the context)
          context = {"cert_sha256", "fingerprint", "model", "session_id", "split", "wire"}

A session that entered the trunk at head depth ``d`` (``lambda_split._head_depth``) is signed for
the trunk it ran: ``split`` is ``[d, B]`` and ``fingerprint`` that of split ``d:B`` (the server's
``head_depth_fingerprints``), so its receipts verify at no other depth and an audit replays it there;
at the split's own depth A the context is the split's, as for a server without a range.
    h_i = SHA256(h_{i-1} || session id (16 bytes) || seq (u64 LE)
                 || SHA256(step frame bytes) || SHA256(result frame bytes without the receipt))
    signature_i = ECDSA-P256-SHA256("lambda-split/receipt/v1\\0" || h_i)

The receipt is always the last tensor of the result frame; "without the receipt" means the frame
with that tensor record cut off and its tensor count lowered by one, so the signed bytes are
exactly the bytes the client decodes. Each signature covers every earlier step through the chain.
"""

from __future__ import annotations

import hashlib
import json
import struct
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from lambda_split._codec import COUNT_OFFSET, Encoding, FrameError, decode_frame, tensor_record
from lambda_split._errors import ProtocolMismatch

__all__ = [
    "RECEIPT_TENSOR",
    "ChainObserver",
    "ClientChain",
    "ReceiptError",
    "ReceiptPolicy",
    "ReceiptSigner",
    "ServerChain",
    "chain_link",
    "chain_start",
    "chain_step",
    "check_server_cert",
    "split_receipt",
    "verify_signature",
]

RECEIPT_TENSOR = "receipt"
RECEIPTS_VERSION = 1
_CHAIN_DOMAIN = b"lambda-split/receipts/v1\0"
_SIGN_DOMAIN = b"lambda-split/receipt/v1\0"
_SEQ = struct.Struct("<Q")
_MAX_SIGNATURE = 80  # DER ECDSA P-256 signatures are 70-72 bytes


class ReceiptError(ProtocolMismatch):
    """A receipt is missing, malformed, or does not verify: the server's answer cannot be attributed
    to it, so it is not used. Exit code 4, like any protocol error."""


def _sha256(data: bytes) -> bytes:
    return hashlib.sha256(data).digest()


def _cert_sha256(cert: x509.Certificate) -> str:
    return hashlib.sha256(cert.public_bytes(serialization.Encoding.DER)).hexdigest()


def context(info: dict[str, Any], session_id: str, wire: str, cert: x509.Certificate) -> dict[str, Any]:
    """What h_0 binds: the trunk (model, fingerprint, split), the session, its wire and the signer."""
    return {
        "cert_sha256": _cert_sha256(cert),
        "fingerprint": str(info["fingerprint"]),
        "model": str(info["model"]),
        "session_id": session_id,
        "split": [int(info["split"][0]), int(info["split"][1])],
        "wire": wire,
    }


def at_depth(info: dict[str, Any], head_depth: int | None) -> dict[str, Any]:
    """``info`` (model, fingerprint, split; head_depths and head_depth_fingerprints if the server has
    them) as seen by a session at ``head_depth``: split ``[d, B]`` with that split's fingerprint."""
    start, stop = int(info["split"][0]), int(info["split"][1])
    if head_depth is None or head_depth == start:
        return info
    lo, hi = (int(v) for v in info.get("head_depths", (start, start)))
    prints = info.get("head_depth_fingerprints") or []
    if not lo <= head_depth <= hi or len(prints) != hi - lo + 1:
        raise ReceiptError(f"no fingerprint for head depth {head_depth}")
    return {**info, "split": [head_depth, stop], "fingerprint": str(prints[head_depth - lo])}


def chain_start(ctx: dict[str, Any]) -> bytes:
    canonical = json.dumps(ctx, sort_keys=True, separators=(",", ":")).encode()
    return _sha256(_CHAIN_DOMAIN + canonical)


def chain_step(prev: bytes, session_id: bytes, seq: int, step_frame: bytes, result_frame: bytes) -> bytes:
    """The next chain value; ``result_frame`` is the result without its receipt."""
    return chain_link(prev, session_id, seq, step_frame, _sha256(result_frame))


def chain_link(prev: bytes, session_id: bytes, seq: int, step_frame: bytes, result_sha256: bytes) -> bytes:
    """:func:`chain_step` when only the result's hash is known (a transcript may keep only that)."""
    return _sha256(prev + session_id + _SEQ.pack(seq) + _sha256(step_frame) + result_sha256)


def _record(signature: bytes) -> bytes:
    return tensor_record(RECEIPT_TENSOR, Encoding.U8, (len(signature),), signature)


def attach_receipt(frame: bytes, signature: bytes) -> bytes:
    """``frame`` with one more tensor, ``receipt`` (U8, the signature), appended last."""
    at = COUNT_OFFSET
    return frame[:at] + bytes((frame[at] + 1,)) + frame[at + 1 :] + _record(signature)


def split_receipt(reply: bytes) -> tuple[bytes, bytes]:
    """``(result frame without the receipt, signature)``; ReceiptError if the last tensor is not one."""
    try:
        frame = decode_frame(reply)
    except FrameError as exc:
        raise ReceiptError(f"bad frame from server: {exc}") from None
    names = list(frame.tensors)
    if not names or names[-1] != RECEIPT_TENSOR or frame.encodings[RECEIPT_TENSOR] is not Encoding.U8:
        raise ReceiptError("the server's result carries no receipt (the last tensor must be 'receipt', U8)")
    if len(names) < 2:
        raise ReceiptError("the server's result carries only a receipt")
    size = int(frame.tensors[RECEIPT_TENSOR].numel())
    if frame.tensors[RECEIPT_TENSOR].dim() != 1 or size > _MAX_SIGNATURE:
        raise ReceiptError("the receipt is not a signature")
    record = len(_record(b"\0" * size))
    at = COUNT_OFFSET
    stripped = reply[:at] + bytes((reply[at] - 1,)) + reply[at + 1 : len(reply) - record]
    return stripped, bytes(reply[len(reply) - size :])


def verify_signature(cert: x509.Certificate, chain_value: bytes, signature: bytes) -> None:
    key = cert.public_key()
    if not isinstance(key, ec.EllipticCurvePublicKey):
        raise ReceiptError("the receipt certificate does not hold an ECDSA key")
    try:
        key.verify(signature, _SIGN_DOMAIN + chain_value, ec.ECDSA(hashes.SHA256()))
    except InvalidSignature:
        raise ReceiptError("a receipt signature does not verify") from None


def check_server_cert(pem: Any, ca: x509.Certificate, *, any_time: bool = False) -> x509.Certificate:
    """The server certificate from a session reply, checked against the pinned CA (valid now, issued
    by it, for serverAuth, ECDSA); ReceiptError otherwise. ``any_time`` skips the validity window
    (an audit of an old transcript: it cannot know when the steps were signed)."""
    from secure_channel import CredentialsError, check_certificate

    if not isinstance(pem, str):
        raise ReceiptError("the session reply carries no receipt certificate")
    try:
        cert = x509.load_pem_x509_certificate(pem.encode())
        when = cert.not_valid_before_utc if any_time else None
        check_certificate(cert, ca, "server", what="the server's receipt certificate", now=when)
    except (ValueError, CredentialsError) as exc:
        raise ReceiptError(f"receipt certificate refused: {exc}") from None
    return cert


class ServerChain:
    """One session's chain on the server; :meth:`seal` signs a result frame."""

    def __init__(self, key: ec.EllipticCurvePrivateKey, session_id: bytes, h0: bytes) -> None:
        self._key = key
        self._session_id = session_id
        self.value = h0

    def seal(self, seq: int, step_frame: bytes, result_frame: bytes) -> bytes:
        self.value = chain_step(self.value, self._session_id, seq, step_frame, result_frame)
        signature = self._key.sign(_SIGN_DOMAIN + self.value, ec.ECDSA(hashes.SHA256()))
        return attach_receipt(result_frame, signature)


class ReceiptSigner:
    """The server's side: ``credentials()`` gives the current server key and certificate (they may be
    renewed while the server runs); ``info`` is the /v1/info body (model, fingerprint, split)."""

    def __init__(self, credentials: Callable[[], Any], info: dict[str, Any]) -> None:
        self._credentials = credentials
        self._info = info

    def open(
        self, session_id: bytes, wire: str, head_depth: int | None = None
    ) -> tuple[ServerChain, dict[str, Any]]:
        """A chain for a new session (at ``head_depth``, None: the split's), and what the session
        reply carries under ``receipts``."""
        creds = self._credentials()
        ctx = context(at_depth(self._info, head_depth), session_id.hex(), wire, creds.cert)
        pem = creds.cert.public_bytes(serialization.Encoding.PEM).decode()
        chain = ServerChain(creds.private_key, session_id, chain_start(ctx))
        return chain, {"version": RECEIPTS_VERSION, "cert": pem}


@dataclass
class StepRecord:
    """One verified step, as the client saw it."""

    seq: int
    step_frame: bytes
    reply: bytes  # the result frame as received, with its receipt
    result_frame: bytes  # without the receipt
    signature: bytes
    chain_value: bytes


class ChainObserver(Protocol):
    """Sees each session a policy starts and each step it verifies (a transcript, spot checks)."""

    def opened(self, chain: ClientChain) -> None: ...
    def step(self, chain: ClientChain, record: StepRecord) -> None: ...


class ClientChain:
    """One session's chain on the client: every reply's receipt is checked before it is used."""

    def __init__(
        self,
        ca: x509.Certificate,
        info: dict[str, Any],
        session_reply: Any,
        wire: str,
        observers: tuple[ChainObserver, ...] = (),
        head_depth: int | None = None,
    ) -> None:
        receipts = session_reply.get("receipts") if isinstance(session_reply, dict) else None
        if not isinstance(receipts, dict) or receipts.get("version") != RECEIPTS_VERSION:
            raise ReceiptError("the server did not agree to sign receipts for this session")
        self.cert = check_server_cert(receipts.get("cert"), ca)
        self.session_id = str(session_reply["session_id"])
        self.cert_pem = str(receipts["cert"])
        self.context = context(at_depth(info, head_depth), self.session_id, wire, self.cert)
        self.value = chain_start(self.context)
        self._raw_id = bytes.fromhex(self.session_id)
        self._observers = observers

    def check(self, seq: int, step_frame: bytes, reply: bytes) -> bytes:
        """Verify ``reply``'s receipt for step ``seq``; return the result frame without it."""
        stripped, signature = split_receipt(reply)
        value = chain_step(self.value, self._raw_id, seq, step_frame, stripped)
        verify_signature(self.cert, value, signature)
        self.value = value
        record = StepRecord(seq, step_frame, reply, stripped, signature, value)
        for observer in self._observers:
            observer.step(self, record)
        return stripped


class ReceiptPolicy:
    """What a client checks receipts against: the pinned CA, and the trunk it verified (``info``:
    model, fingerprint, split). ``observers`` see every verified step (a transcript, spot checks)."""

    def __init__(
        self, ca: x509.Certificate, info: dict[str, Any], observers: tuple[ChainObserver, ...] = ()
    ) -> None:
        self.ca = ca
        self.info = {"model": info["model"], "fingerprint": info["fingerprint"], "split": list(info["split"])}
        for name in ("head_depths", "head_depth_fingerprints"):  # sessions at other head depths
            if info.get(name) is not None:
                self.info[name] = list(info[name])
        self.observers = observers

    def start(self, session_reply: Any, wire: str, head_depth: int | None = None) -> ClientChain:
        """The chain of a session just opened (at ``head_depth``; None: the split's own)."""
        chain = ClientChain(self.ca, self.info, session_reply, wire, self.observers, head_depth)
        for observer in self.observers:
            observer.opened(chain)
        return chain
