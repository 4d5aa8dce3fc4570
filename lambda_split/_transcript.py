"""The transcript of a verified generation: receipts plus the frames an auditor replays.

JSON lines, UTF-8, never pickle. The first line is the header; then, in the order they happened,
one line per session opened and one per step::

    {"format": "lambda-split-transcript", "version": 1, "ca": PEM of the pinned CA}
    {"type": "session", "session_id": hex, "cert": PEM, "context": {... what h_0 binds ...}}
    {"type": "step", "session_id": hex, "seq": int, "input": base64 step frame,
     "result_sha256": hex, "output": base64 result frame without receipt, or null,
     "signature": base64 DER}

Every step's input is kept (the auditor needs them all to rebuild the trunk's KV cache); its
output only if the step was picked for audit (``audit_rate``, all steps by default), else just
its hash, which the chain needs. The frames are hidden states: with the public weights they give
back the prompt and the answer, so a transcript is as sensitive as the conversation itself.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import random
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from lambda_split._receipts import ClientChain, StepRecord

FORMAT = "lambda-split-transcript"
VERSION = 1


class TranscriptError(ValueError):
    """The file is not a transcript this version can read."""


class TranscriptWriter:
    """A :class:`~lambda_split._receipts.ChainObserver` that appends each session and step to ``path``
    (created with mode 0600; an existing file is refused unless ``overwrite``)."""

    def __init__(
        self,
        path: str | os.PathLike[str],
        ca: x509.Certificate,
        *,
        audit_rate: float = 1.0,
        overwrite: bool = False,
        rng: random.Random | None = None,
    ) -> None:
        if not 0.0 <= audit_rate <= 1.0:
            raise ValueError("audit_rate must be in [0, 1]")
        self.path = Path(path)
        self.audit_rate = audit_rate
        self._rng = rng or random.SystemRandom()
        flags = os.O_WRONLY | os.O_CREAT | (os.O_TRUNC if overwrite else os.O_EXCL)
        try:
            fd = os.open(self.path, flags, 0o600)
        except FileExistsError:
            raise FileExistsError(f"{self.path} exists; choose another transcript file") from None
        self._file: IO[str] = os.fdopen(fd, "w", encoding="utf-8")
        self._lock = threading.Lock()
        pem = ca.public_bytes(serialization.Encoding.PEM).decode()
        self._write({"format": FORMAT, "version": VERSION, "ca": pem})

    def _write(self, line: dict[str, Any]) -> None:
        with self._lock:
            self._file.write(json.dumps(line, separators=(",", ":")) + "\n")
            self._file.flush()

    def opened(self, chain: ClientChain) -> None:
        self._write(
            {
                "type": "session",
                "session_id": chain.session_id,
                "cert": chain.cert_pem,
                "context": chain.context,
            }
        )

    def step(self, chain: ClientChain, record: StepRecord) -> None:
        audited = self.audit_rate >= 1.0 or self._rng.random() < self.audit_rate
        self._write(
            {
                "type": "step",
                "session_id": chain.session_id,
                "seq": record.seq,
                "input": _b64(record.step_frame),
                "result_sha256": hashlib.sha256(record.result_frame).hexdigest(),
                "output": _b64(record.result_frame) if audited else None,
                "signature": _b64(record.signature),
            }
        )

    def close(self) -> None:
        with self._lock:
            self._file.close()


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


@dataclass
class StepEntry:
    seq: int
    input: bytes
    result_sha256: bytes
    output: bytes | None
    signature: bytes


@dataclass
class SessionEntry:
    session_id: str
    cert_pem: str
    context: dict[str, Any]
    steps: list[StepEntry] = field(default_factory=list)


@dataclass
class Transcript:
    ca_pem: str
    sessions: list[SessionEntry]


def read_transcript(path: str | os.PathLike[str]) -> Transcript:
    """Parse a transcript file; TranscriptError on anything malformed (nothing is evaluated)."""
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise TranscriptError(f"cannot read {path}: {exc}") from None
    try:
        header = json.loads(lines[0]) if lines else None
        if not isinstance(header, dict) or header.get("format") != FORMAT or header.get("version") != VERSION:
            raise TranscriptError(f"{path} is not a {FORMAT} version {VERSION}")
        sessions: dict[str, SessionEntry] = {}
        for number, text in enumerate(lines[1:], start=2):
            line = json.loads(text)
            if line.get("type") == "session":
                sid = str(line["session_id"])
                if sid in sessions or not isinstance(line["context"], dict):
                    raise TranscriptError(f"line {number}: a session is opened twice or has no context")
                sessions[sid] = SessionEntry(sid, str(line["cert"]), line["context"])
            elif line.get("type") == "step":
                session = sessions.get(str(line["session_id"]))
                if session is None:
                    raise TranscriptError(f"line {number}: a step of a session not opened")
                output = line["output"]
                session.steps.append(
                    StepEntry(
                        int(line["seq"]),
                        base64.b64decode(line["input"], validate=True),
                        bytes.fromhex(line["result_sha256"]),
                        None if output is None else base64.b64decode(output, validate=True),
                        base64.b64decode(line["signature"], validate=True),
                    )
                )
            else:
                raise TranscriptError(f"line {number}: unknown entry")
        return Transcript(str(header["ca"]), list(sessions.values()))
    except TranscriptError:
        raise
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise TranscriptError(f"{path} is malformed: {type(exc).__name__}: {exc}") from None
