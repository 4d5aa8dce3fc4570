"""Audits: check a transcript's receipts, replay its steps on the trunk's weights, compare.

:func:`audit` verifies every signature and the hash chain of each session (against the pinned CA),
then loads only the trunk span, replays each session's steps in order (prefill and decode, with
the KV cache) and compares every audited output with what the server returned. The deviation of a
step is the largest, over its real (mask 1) tokens, of ``|server - local| / |local|`` (L2 norms over
the hidden size), where ``local`` went through the same wire encoding. :data:`TOLERANCE` holds the
bound per encoding, calibrated on honest servers with cross-session batching (benchmarks/verify).
"""

from __future__ import annotations

import base64
import hashlib
import os
from dataclasses import dataclass
from typing import Any

import torch
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from lambda_split._codec import Encoding, FrameError, FrameKind, decode_frame, wire_roundtrip
from lambda_split._errors import SplitError
from lambda_split._models import Checkpoint
from lambda_split._parts import PartState, Trunk
from lambda_split._receipts import (
    ReceiptError,
    chain_link,
    chain_start,
    check_server_cert,
    context,
    verify_signature,
)
from lambda_split._transcript import SessionEntry, Transcript, TranscriptError, read_transcript
from lambda_split.protocol import llm_step_inputs

#: The largest deviation an honest step may show, per wire encoding (see the module doc).
TOLERANCE: dict[str, float] = {"fp32": 1e-4, "fp16": 2e-3, "bf16": 1.6e-2, "int8": 2e-2}


class AuditFailed(SplitError):
    """A step the server signed does not match the trunk's weights: the server did not run the
    declared trunk. ``report`` holds the per-step verdicts. Exit code 5."""

    def __init__(self, message: str, report: dict[str, Any] | None = None) -> None:
        super().__init__(message)
        self.report = report or {}


def deviation(server: torch.Tensor, local: torch.Tensor, mask: torch.Tensor) -> float:
    """Max over real tokens of ``||server - local|| / ||local||``; ``(B, T, C)``, mask ``(B, T)``."""
    if server.shape != local.shape:
        return float("inf")
    keep = mask.bool()  # (B, T)
    if not bool(keep.any()):
        return 0.0
    diff = (server.float() - local.float()).norm(dim=-1)[keep]  # (N,)
    scale = local.float().norm(dim=-1)[keep].clamp_min(1e-6)  # (N,)
    return float((diff / scale).max())


class Replayer:
    """The trunk on this machine, one KV cache per session, fed the sessions' step frames."""

    def __init__(self, trunk: Trunk) -> None:
        self.trunk = trunk
        self.dtype = next(iter(trunk.parameters()), torch.empty(0)).dtype
        self._states: dict[str, PartState] = {}
        self._starts: dict[str, int] = {}  # sessions that enter the trunk deeper (their head depth)

    def begin(self, session_id: str, start: int) -> None:
        """Replay ``session_id`` from trunk layer ``start`` (its head depth; ValueError if not held)."""
        self.trunk.skip(start)
        self._starts[session_id] = start

    def run(self, session_id: str, step_frame: bytes) -> tuple[torch.Tensor, torch.Tensor]:
        """``(local output (B, T, C) fp32, mask (B, T))`` for one step frame."""
        frame = decode_frame(step_frame)
        if frame.kind is not FrameKind.LLM_STEP:
            raise FrameError("not a language-model step frame")
        hidden, mask = llm_step_inputs(frame)  # an absent mask is all ones
        state = self._states.setdefault(session_id, self.trunk.new_state())
        with torch.inference_mode():
            start = self._starts.get(session_id)
            out = self.trunk(hidden.to(self.dtype), mask.long(), state, start=start)  # (B, T, C)
        return out.float(), mask

    def forget(self, session_id: str) -> None:
        self._states.pop(session_id, None)
        self._starts.pop(session_id, None)


def judge(local: torch.Tensor, mask: torch.Tensor, result_frame: bytes, wire: str) -> float:
    """The deviation of the server's result frame from the local output, in the session's wire."""
    try:
        served = decode_frame(result_frame).tensor("hidden", rank=3)
    except FrameError:
        return float("inf")
    return deviation(served, wire_roundtrip(local, Encoding.parse(wire)), mask)


@dataclass(frozen=True)
class _Verified:
    session: SessionEntry
    cert: x509.Certificate
    chain: list[bytes]  # h_1 .. h_n, each signed


def verify_receipts(transcript: Transcript, ca: x509.Certificate) -> list[_Verified]:
    """Check each session's certificate, chain and signatures; ReceiptError at the first fault."""
    verified = []
    for session in transcript.sessions:
        # The validity window is the signing time's business, and the transcript does not prove when
        # that was: an audit checks the issuer, the role and the key, so an expired certificate's
        # signatures stay checkable (the report names the window).
        cert = check_server_cert(session.cert_pem, ca, any_time=True)
        ctx = session.context
        expected = context(ctx, session.session_id, str(ctx.get("wire")), cert)
        if expected != ctx:
            raise ReceiptError(f"session {session.session_id}: the context does not match its certificate")
        Encoding.parse(str(ctx["wire"]))
        value, raw = chain_start(ctx), bytes.fromhex(session.session_id)
        values = []
        for index, step in enumerate(session.steps):
            if step.seq != index:
                raise ReceiptError(f"session {session.session_id}: step {step.seq} where {index} was due")
            if step.output is not None and hashlib.sha256(step.output).digest() != step.result_sha256:
                raise ReceiptError(
                    f"session {session.session_id} step {step.seq}: output does not match its hash"
                )
            value = chain_link(value, raw, step.seq, step.input, step.result_sha256)
            verify_signature(cert, value, step.signature)
            values.append(value)
        verified.append(_Verified(session, cert, values))
    return verified


def load_trunk(model: str | Checkpoint, split: tuple[int, int]) -> Trunk:
    """Only the trunk span ``[A, B)`` of ``model``."""
    from lambda_split._models import resolve
    from lambda_split._parts import SplitSpec, load_parts

    checkpoint = resolve(model) if isinstance(model, str) else model
    spec = SplitSpec(split[0], split[1], int(checkpoint.config.num_hidden_layers))
    trunk = load_parts(checkpoint, spec, ("trunk",)).trunk
    if trunk is None:  # pragma: no cover - load_parts builds what it is asked for
        raise RuntimeError("trunk was not built")
    return trunk


def audit(
    path: str | os.PathLike[str],
    model: str,
    *,
    ca_pem: bytes | None = None,
    trunk: Trunk | None = None,
    tolerance: dict[str, float] | None = None,
    replica: Any = None,
) -> dict[str, Any]:
    """Audit the transcript at ``path`` with ``model``'s weights and return the report; the CA is
    ``ca_pem`` if given (a deployment's ca.pem), else the one the transcript carries.

    Raises TranscriptError (unreadable), ReceiptError (a signature or the chain does not verify:
    nothing in the file can be attributed to the server) or FingerprintMismatch (another model).
    The report's ``verdict`` is ``pass`` or ``fail``; it never raises for a mismatch.

    With ``replica`` (a :class:`~lambda_split._replica.RemoteReplayer`), the steps are replayed on
    that audit replica instead of local weights: ``model`` is only hashed for the fingerprint check
    (the trunk is not built here), the replica must serve each session's fingerprint and split
    (else ReplicaMismatch), and each replica session is closed after its session's replay.
    """
    from lambda_split._errors import FingerprintMismatch
    from lambda_split._models import fingerprint, resolve

    bounds = tolerance or TOLERANCE
    transcript = read_transcript(path)
    ca_text = ca_pem if ca_pem is not None else transcript.ca_pem.encode()
    try:
        ca = x509.load_pem_x509_certificate(ca_text)
    except ValueError:
        raise TranscriptError("the CA is not a PEM certificate") from None
    verified = verify_receipts(transcript, ca)
    sessions: list[dict[str, Any]] = []
    failed = 0
    checked: set[tuple[tuple[int, int], str]] = set()  # (split, fingerprint) found in ``model``
    trunks: dict[tuple[int, int], Trunk] = {}
    for item in verified:
        ctx = item.session.context
        split = (int(ctx["split"][0]), int(ctx["split"][1]))
        # Every session is checked against its own signed fingerprint and replayed on its own span.
        signed = (split, str(ctx["fingerprint"]))
        if (trunk is None or replica is not None) and signed not in checked:
            if fingerprint(resolve(model), split) != ctx["fingerprint"]:
                raise FingerprintMismatch(f"{model} is not the model {ctx['model']} the server signed for")
            checked.add(signed)
        replay: Any = replica
        if replica is not None:
            replica.check(ctx)
        else:
            if trunk is not None:
                if (trunk.first, trunk.first + len(trunk.layers)) != split:
                    raise FingerprintMismatch(
                        f"the trunk given serves other layers than the signed split {split}"
                    )
                part = trunk
            else:
                part = (
                    trunks[split] if split in trunks else trunks.setdefault(split, load_trunk(model, split))
                )
            replay = Replayer(part)
        wire = str(ctx["wire"])
        verdicts: list[dict[str, Any]] = []
        for step, value in zip(item.session.steps, item.chain, strict=True):
            try:
                local, mask = replay.run(item.session.session_id, step.input)
            except FrameError as exc:
                raise TranscriptError(f"step {step.seq}: the step frame does not decode: {exc}") from None
            verdict: dict[str, Any] = {"seq": step.seq, "audited": step.output is not None}
            if step.output is not None:
                dev = judge(local, mask, step.output, wire)
                verdict.update(deviation=dev, tolerance=bounds[wire], match=dev <= bounds[wire])
                failed += dev > bounds[wire]
            verdict.update(chain=value.hex(), signature=base64.b64encode(step.signature).decode())
            verdicts.append(verdict)
        replay.forget(item.session.session_id)
        sessions.append({"session_id": item.session.session_id, "context": ctx, "steps": verdicts})
    audited = sum(bool(v["audited"]) for s in sessions for v in s["steps"])
    return {
        "verdict": "fail" if failed else "pass",
        "failed_steps": failed,
        "audited_steps": audited,
        "steps": sum(len(s["steps"]) for s in sessions),
        "receipts": "valid",
        "ca_sha256": hashlib.sha256(ca.public_bytes(serialization.Encoding.DER)).hexdigest(),
        "ca_source": "given" if ca_pem is not None else "transcript",
        "tolerance": dict(bounds),
        "auditor": "local" if replica is None else f"replica {replica.url}".strip(),
        "sessions": sessions,
    }
