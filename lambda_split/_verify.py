"""Turn on verification for a :class:`SplitClient`: signed receipts, a transcript, online spot checks.

client = SplitClient.connect(url, security="tls", keys="keys/", model="smollm2-135m")
verification = enable_verification(client, keys="keys/", transcript="run.jsonl", verify_rate=0.1)
client.generate("...")          # ReceiptError (bad receipt) or AuditFailed (a spot check failed)
verification.close()
"""

from __future__ import annotations

import os
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cryptography import x509

from lambda_split._audit import TOLERANCE, AuditFailed, Replayer, judge, load_trunk
from lambda_split._receipts import ChainObserver, ClientChain, ReceiptError, ReceiptPolicy, StepRecord
from lambda_split._replica import RemoteReplayer, connect_replica
from lambda_split._transcript import TranscriptWriter
from secure_channel import Transport

__all__ = ["SpotChecker", "Verification", "enable_verification", "load_ca"]


def load_ca(keys: str | os.PathLike[str] | None) -> x509.Certificate:
    """The pinned CA (``ca.pem``) of a keys directory, or a path to a PEM file itself."""
    if keys is None:
        raise ReceiptError("receipts need the deployment's CA: pass --keys DIR (with ca.pem)")
    path = Path(keys)
    path = path / "ca.pem" if path.is_dir() else path
    try:
        return x509.load_pem_x509_certificate(path.read_bytes())
    except (OSError, ValueError) as exc:
        raise ReceiptError(f"cannot read the CA certificate {path}: {exc}") from None


class SpotChecker:
    """Recomputes steps on the client's own copy of the trunk. Every step's input goes through the
    local trunk (its KV cache needs them all); a ``rate`` fraction of steps, drawn at random, have
    their output compared with the server's, and a mismatch raises :class:`AuditFailed`."""

    def __init__(self, replayer: Replayer | Any, rate: float, rng: random.Random | None = None) -> None:
        """``replayer`` is a :class:`Replayer` (local weights) or an audit replica's
        :class:`~lambda_split._replica.RemoteReplayer`."""
        if not 0.0 < rate <= 1.0:
            raise ValueError("verify rate must be in (0, 1]")
        self.replayer = replayer
        self.rate = rate
        self._rng = rng or random.SystemRandom()
        self.checked = 0
        self.worst = 0.0

    def opened(self, chain: ClientChain) -> None:
        self.replayer.forget(chain.session_id)
        if isinstance(self.replayer, Replayer):  # a session at its own head depth enters deeper
            self.replayer.begin(chain.session_id, int(chain.context["split"][0]))

    def step(self, chain: ClientChain, record: StepRecord) -> None:
        local, mask = self.replayer.run(chain.session_id, record.step_frame)
        if self.rate < 1.0 and self._rng.random() >= self.rate:
            return
        wire = str(chain.context["wire"])
        dev = judge(local, mask, record.result_frame, wire)
        self.checked += 1
        self.worst = max(self.worst, dev)
        if dev > TOLERANCE[wire]:
            raise AuditFailed(
                f"spot check failed: step {record.seq} of session {chain.session_id} deviates by {dev:.3g} "
                f"from the trunk's weights (tolerance {TOLERANCE[wire]:g} for {wire}); the server did not "
                "run the declared trunk, generation stopped",
                {"session_id": chain.session_id, "seq": record.seq, "deviation": dev},
            )


@dataclass
class Verification:
    """What :func:`enable_verification` set up; :meth:`close` ends the transcript."""

    policy: ReceiptPolicy
    transcript: TranscriptWriter | None = None
    checker: SpotChecker | None = None
    observers: list[Any] = field(default_factory=list)

    def close(self) -> None:
        try:
            if self.transcript is not None:
                self.transcript.close()
        finally:
            replayer = None if self.checker is None else self.checker.replayer
            if replayer is not None and hasattr(replayer, "close"):
                replayer.close()  # an audit replica: its sessions and transport


def enable_verification(
    client: Any,
    *,
    keys: str | os.PathLike[str] | None,
    transcript: str | os.PathLike[str] | None = None,
    verify_rate: float = 0.0,
    audit_rate: float = 1.0,
    rng: random.Random | None = None,
    audit_server: str | Transport | None = None,
    timeout: float = 60.0,
) -> Verification:
    """Ask ``client``'s server to sign every step (checked against the CA in ``keys``); keep a
    transcript at ``transcript`` (its outputs for an ``audit_rate`` fraction of steps); recompute a
    ``verify_rate`` fraction of steps locally (this loads the trunk span on the client), or, with
    ``audit_server`` (a URL reached in the client's security mode with ``keys``, or an open
    transport), on that audit replica: it must serve the same fingerprint and split, and it sees
    every hidden state (SECURITY.md, "Audit replicas")."""
    ca = load_ca(keys)
    observers: list[ChainObserver] = []
    checker = None
    depth = getattr(client, "head_depth", None)
    if verify_rate > 0:
        spec = client.info.split
        if depth is not None:  # the trunk from the shallowest depth a session may enter at
            if audit_server is not None:
                raise ValueError("spot checks on an audit replica are not supported with a head depth yet")
            spec = (client.info.depths.lo if depth == "random" else int(depth), spec[1])
        if audit_server is None:
            replayer: Replayer | RemoteReplayer = Replayer(load_trunk(client.model.checkpoint, spec))
        else:
            expected = {"fingerprint": client.info.fingerprint, "split": spec}
            replayer = connect_replica(
                audit_server,
                security=client.transport.security,
                keys=keys,
                expected=expected,
                timeout=timeout,
            )
        checker = SpotChecker(replayer, verify_rate, rng)
        observers.append(checker)
    elif audit_server is not None:
        raise ValueError("an audit server is for spot checks: give it a verify_rate above 0")
    try:
        writer = TranscriptWriter(transcript, ca, audit_rate=audit_rate, rng=rng) if transcript else None
    except BaseException:
        if checker is not None and isinstance(checker.replayer, RemoteReplayer):
            checker.replayer.close()
        raise
    if writer is not None:
        observers.insert(0, writer)  # a step is on file before a spot check can stop the generation
    info: dict[str, Any] = {
        "model": client.info.model,
        "fingerprint": client.info.fingerprint,
        "split": client.info.split,
    }
    if depth is not None:  # fingerprints the client checked at connect
        info.update(
            head_depths=client.info.head_depths, head_depth_fingerprints=client.info.head_depth_fingerprints
        )
    policy = ReceiptPolicy(ca, info, tuple(observers))
    client.receipts = policy
    return Verification(policy, writer, checker, list(observers))
