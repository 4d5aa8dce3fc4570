"""Trunk sessions: ownership, sequence numbers, token and memory limits, idle expiry.

:class:`TrunkService` is transport-free. The HTTP server and the in-process
transport both drive it; the model arithmetic is delegated to an executor.
"""

from __future__ import annotations

import secrets
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import torch

from lambda_split._buckets import Buckets
from lambda_split._codec import (
    SESSION_ID_BYTES,
    Encoding,
    Frame,
    FrameError,
    FrameKind,
    FrameLimits,
    decode_frame,
    encode_frame,
)


class ServiceError(Exception):
    """A request the trunk refuses. Maps to an HTTP status and a JSON error code."""

    def __init__(self, status: int, code: str, message: str, *, retry_after: int | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.retry_after = retry_after


@dataclass(frozen=True)
class ServiceLimits:
    """Bounds on what any client can make the trunk hold or compute."""

    max_sessions: int = 64
    max_tokens_per_session: int = 4096
    max_batch: int = 8
    max_step_tokens: int = 2048
    idle_timeout_s: float = 300.0
    max_cache_bytes: int = 2 * 1024**3
    #: sessions one identity may hold at once, so one device cannot starve the others
    max_sessions_per_owner: int | None = None
    frame: FrameLimits = field(default_factory=FrameLimits)

    def __post_init__(self) -> None:
        for name in (
            "max_sessions",
            "max_tokens_per_session",
            "max_batch",
            "max_step_tokens",
            "max_cache_bytes",
        ):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1")
        if self.idle_timeout_s <= 0:
            raise ValueError("idle_timeout_s must be positive")
        if self.max_sessions_per_owner is not None and self.max_sessions_per_owner < 1:
            raise ValueError("max_sessions_per_owner must be at least 1")

    def advertised(self) -> dict[str, Any]:
        """The limits a client can check before uploading, as ``/v1/info`` publishes them."""
        return {
            "max_batch": self.max_batch,
            "max_step_tokens": self.max_step_tokens,
            "max_tokens_per_session": self.max_tokens_per_session,
            "max_frame_bytes": self.frame.max_bytes,
            "max_sessions": self.max_sessions,
            "idle_timeout_s": self.idle_timeout_s,
        }


class Executor(Protocol):
    """What the service needs from the model side of a trunk."""

    #: Frame kinds a step may carry, and the kind of the reply.
    step_kinds: frozenset[FrameKind]
    result_kind: FrameKind

    def new_state(self) -> Any: ...
    def step(self, state: Any, frame: Frame, limits: ServiceLimits) -> dict[str, torch.Tensor]: ...
    def state_bytes(self, state: Any) -> int: ...
    def state_tokens(self, state: Any) -> int: ...
    def describe(self) -> dict[str, Any]: ...


@runtime_checkable
class BatchingExecutor(Protocol):
    """An executor that schedules steps itself (so the service takes no compute lock) and
    whose session state holds resources to give back when a session ends."""

    def step_as(
        self, owner: str, state: Any, frame: Frame, limits: ServiceLimits
    ) -> dict[str, torch.Tensor]: ...
    def release(self, state: Any) -> None: ...
    def stats(self) -> dict[str, Any]: ...


#: Upper bounds (seconds) of the step-time histograms (:attr:`TrunkService.step_times`).
STEP_TIME_BOUNDS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0)
#: What a step did, the ``phase`` label of ``lambda_split_step_seconds``: an LLM step with one new
#: position per row (``decode``) or more (``prefill``: a prompt or a chunk of one), or a diffusion
#: trunk's step (``denoise``).
STEP_PHASES = ("decode", "prefill", "denoise")


def _step_phase(frame: Frame) -> str:
    """The :data:`STEP_PHASES` entry of an answered step's frame."""
    if frame.kind is not FrameKind.LLM_STEP:
        return "denoise"
    return "decode" if frame.tensor("hidden", rank=3).shape[1] == 1 else "prefill"


@dataclass
class _Session:
    owner: str
    wire: Encoding
    state: Any
    next_seq: int = 0
    last_used: float = field(default_factory=time.monotonic)
    busy: bool = False
    nbytes: int = 0
    chain: Any = None  # a ServerChain when the client asked for signed receipts (lambda_split._receipts)


class TrunkService:
    """Holds trunk sessions for many clients, each bound to the identity that opened it."""

    def __init__(
        self, executor: Executor, *, limits: ServiceLimits | None = None, clock: Any = time.monotonic
    ) -> None:
        self.executor = executor  # (a property: it also notes whether the executor batches)
        self.limits = limits or ServiceLimits()
        self._clock = clock
        self._sessions: OrderedDict[bytes, _Session] = OrderedDict()  # least recently used first
        self._lock = threading.Lock()
        self._compute = threading.Lock()
        self.evicted = 0
        self.expired = 0
        #: Seconds the service took over each step it answered, by :func:`_step_phase`, from the
        #: frame reaching :meth:`step` to its reply frame (queue, forward and both codecs; not the
        #: network, the event loop or the security layers): ``/metrics``
        #: ``lambda_split_step_seconds{phase}``. A prompt's step is kept apart from the decode
        #: steps, whose latency it would otherwise hide.
        self.step_times = {phase: Buckets(STEP_TIME_BOUNDS) for phase in STEP_PHASES}
        #: signs step receipts for sessions that ask (a ReceiptSigner; None: this server cannot)
        self.receipts: Any = None

    # -- bookkeeping ----------------------------------------------------------------------------
    @property
    def executor(self) -> Executor:
        return self._executor

    @executor.setter
    def executor(self, executor: Executor) -> None:
        self._executor = executor
        # Checked once here, not per step: a runtime Protocol check walks the protocol's members.
        self._batcher = executor if isinstance(executor, BatchingExecutor) else None

    @property
    def open_sessions(self) -> int:
        return len(self._sessions)

    @property
    def cache_bytes(self) -> int:
        return sum(session.nbytes for session in self._sessions.values())

    @property
    def batching(self) -> dict[str, Any] | None:
        """Batch sizes, queue waits and KV slot occupancy, if the executor batches steps."""
        return self._batcher.stats() if self._batcher is not None else None

    def expire_idle(self) -> int:
        """Drop sessions idle for longer than the timeout; return how many were dropped."""
        deadline = self._clock() - self.limits.idle_timeout_s
        with self._lock:
            stale = [sid for sid, s in self._sessions.items() if s.last_used < deadline and not s.busy]
            for sid in stale:
                self._drop(sid)
            self.expired += len(stale)
        return len(stale)

    def _lookup(self, owner: str, session_id: str) -> tuple[bytes, _Session]:
        try:
            raw = bytes.fromhex(session_id)
        except ValueError:
            raw = b""
        session = self._sessions.get(raw) if len(raw) == SESSION_ID_BYTES else None
        # Another client's session is reported exactly like a missing one.
        if session is None or not secrets.compare_digest(session.owner, owner):
            raise ServiceError(404, "session_not_found", "no such session (it may have expired)")
        return raw, session

    # -- operations -----------------------------------------------------------------------------
    def open_session(
        self, owner: str, wire: str, *, receipts: bool = False, head_depth: Any = None
    ) -> dict[str, Any]:
        """Open a session; ``head_depth`` (a trunk that allows a range of them) is the layer the
        session enters the trunk at, None for the split's own (else 400 ``bad_head_depth``)."""
        try:
            encoding = Encoding.parse(wire)
        except ValueError as exc:
            raise ServiceError(400, "bad_wire_encoding", str(exc)) from None
        depths = getattr(self.executor, "head_depths", None)
        if head_depth is not None and (depths is None or head_depth not in depths):
            where = (
                f"in {depths} (/v1/info head_depths)" if depths is not None else "absent: this trunk has none"
            )
            raise ServiceError(400, "bad_head_depth", f"head_depth must be a whole number {where}")
        if receipts and self.receipts is None:
            raise ServiceError(
                400, "receipts_unavailable", "this server has no signing key (serve it with --keys DIR)"
            )
        self.expire_idle()
        with self._lock:
            if len(self._sessions) >= self.limits.max_sessions:
                raise ServiceError(
                    503, "too_many_sessions", "the server holds its maximum number of sessions", retry_after=5
                )
            cap = self.limits.max_sessions_per_owner
            if cap is not None and sum(s.owner == owner for s in self._sessions.values()) >= cap:
                raise ServiceError(
                    429, "too_many_sessions_for_identity", f"this identity already holds {cap} sessions",
                    retry_after=5,
                )  # fmt: skip
            raw = secrets.token_bytes(SESSION_ID_BYTES)
            # (an executor with head_depths takes a depth: the check above refused it otherwise)
            executor: Any = self.executor
            state = executor.new_state() if head_depth is None else executor.new_state(head_depth)
            depth = getattr(state, "start", None) if depths is not None else None
            chain, signed = self.receipts.open(raw, encoding.wire_name, depth) if receipts else (None, None)
            self._sessions[raw] = _Session(owner, encoding, state, last_used=self._clock(), chain=chain)
        reply = {
            "session_id": raw.hex(),
            "wire": encoding.wire_name,
            "max_tokens": self.limits.max_tokens_per_session,
            "idle_timeout_s": self.limits.idle_timeout_s,
        }
        if depth is not None:
            reply["head_depth"] = depth
        return reply if signed is None else {**reply, "receipts": signed}

    def step(self, owner: str, session_id: str, body: bytes) -> bytes:
        started = time.perf_counter()
        with self._lock:
            raw, session = self._lookup(owner, session_id)
            if session.busy:
                raise ServiceError(409, "session_busy", "a step of this session is already running")
            session.busy = True
        phase = None
        try:
            reply, phase = self._step(raw, session, body)
            return reply
        finally:
            with self._lock:
                session.busy = False
                session.last_used = self._clock()
                if phase is not None:  # answered
                    self.step_times[phase].record(time.perf_counter() - started)

    def _step(self, raw: bytes, session: _Session, body: bytes) -> tuple[bytes, str]:
        """The step's reply frame and its :func:`_step_phase`."""
        if len(body) > self.limits.frame.max_bytes:  # the HTTP body limit may allow sealing overhead
            raise ServiceError(
                413,
                "frame_too_large",
                f"a step frame is at most {self.limits.frame.max_bytes:,} bytes (limits.max_frame_bytes)",
            )
        try:
            frame = decode_frame(body, self.limits.frame)
            if frame.session_id is not None and frame.session_id != raw:
                raise FrameError("frame session id does not match the session its transport names")
            if frame.kind not in self.executor.step_kinds:
                raise FrameError(f"frame kind {frame.kind.name} is not served by this trunk")
            if frame.seq != session.next_seq:
                raise ServiceError(409, "bad_sequence", f"expected sequence number {session.next_seq}")
            if self._batcher is not None:
                outputs = self._batcher.step_as(session.owner, session.state, frame, self.limits)
            else:
                with self._compute:
                    outputs = self.executor.step(session.state, frame, self.limits)
        except FrameError as exc:
            raise ServiceError(400, "bad_frame", str(exc)) from None
        session.next_seq += 1
        session.nbytes = self.executor.state_bytes(session.state)
        with self._lock:
            if raw in self._sessions:
                self._sessions.move_to_end(raw)
            self._enforce_memory(keep=raw)
        tensors = {name: (value, session.wire) for name, value in outputs.items()}
        sid = None if frame.session_id is None else raw  # the reply names the session as the step did
        result = encode_frame(self.executor.result_kind, sid, frame.seq, tensors, self.limits.frame)
        if session.chain is not None:
            result = session.chain.seal(frame.seq, body, result)
        return result, _step_phase(frame)

    def _enforce_memory(self, keep: bytes) -> None:
        while self.cache_bytes > self.limits.max_cache_bytes:
            victim = next((sid for sid, s in self._sessions.items() if sid != keep and not s.busy), None)
            if victim is None:
                break
            self._drop(victim)
            self.evicted += 1

    def _drop(self, sid: bytes) -> None:
        session = self._sessions.pop(sid)
        if self._batcher is not None:
            self._batcher.release(session.state)

    def close_owners(self, owners: frozenset[str]) -> int:
        """Drop every session of ``owners`` (identities just revoked); return how many."""
        with self._lock:
            doomed = [sid for sid, s in self._sessions.items() if s.owner in owners]
            for sid in doomed:
                self._drop(sid)
        return len(doomed)

    def close_session(self, owner: str, session_id: str) -> None:
        with self._lock:
            raw, _ = self._lookup(owner, session_id)
            self._drop(raw)
