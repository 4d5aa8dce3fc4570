"""Trunk sessions: ownership, sequence numbers, token and memory limits, idle expiry.

:class:`TrunkService` is transport-free. The HTTP server and the in-process
transport both drive it; the model arithmetic is delegated to an executor.
"""

from __future__ import annotations

import secrets
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import torch

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
from lambda_split._head_depth import HeadDepths
from lambda_split._kvslots import PoolBatch, SlotPool, SlotPools, SlotState
from lambda_split._models import Checkpoint
from lambda_split._parts import Trunk
from lambda_split._scheduler import QueueTimeout, SchedulerConfig, Step, StepScheduler
from lambda_split.protocol import llm_step_inputs


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


@dataclass(frozen=True)
class _Work:
    state: SlotState
    hidden: torch.Tensor  # (B, T, C) in the trunk's dtype
    mask: torch.Tensor  # (B, T) of 0/1


class LLMExecutor:
    """Runs a decoder trunk: hidden (B, T, C) and mask (B, T) in, hidden (B, T, C) out.

    Steps of different sessions are batched by a :class:`StepScheduler`; their KV caches live in
    :class:`SlotPools`. With ``head_depths`` (a :class:`HeadDepths` within the trunk's layers), a
    session may enter the trunk at any layer of that range (:mod:`lambda_split._head_depth`); only
    steps entering at the same layer share a forward, and each depth has a pool of its own layers.
    """

    step_kinds = frozenset({FrameKind.LLM_STEP})
    result_kind = FrameKind.LLM_RESULT

    def __init__(
        self,
        trunk: Trunk,
        scheduling: SchedulerConfig | None = None,
        *,
        clock: Callable[[], float] = time.monotonic,
        head_depths: HeadDepths | None = None,
        default_depth: int | None = None,
    ) -> None:
        self.trunk = trunk
        self.hidden_size = int(trunk.config.hidden_size)
        self.head_depths = head_depths or HeadDepths(trunk.first, trunk.first)
        self.default_depth = trunk.first if default_depth is None else default_depth
        if self.head_depths.lo < trunk.first or self.head_depths.hi > trunk.stop:
            raise ValueError(f"head depths {self.head_depths} lie outside the trunk's layers")
        if self.default_depth not in self.head_depths:
            raise ValueError(f"the default depth {self.default_depth} is not in {self.head_depths}")
        self.pools = SlotPools(self.head_depths, trunk.stop)
        self.scheduler = StepScheduler(self._run, scheduling, clock=clock)

    @property
    def pool(self) -> SlotPool:
        """The KV pool of sessions at the split's own depth."""
        return self.pools[self.default_depth]

    def new_state(self, head_depth: int | None = None) -> SlotState:
        depth = self.default_depth if head_depth is None else head_depth
        if depth not in self.head_depths:
            raise ServiceError(
                400,
                "bad_head_depth",
                f"head_depth must be a whole number in {self.head_depths} (/v1/info head_depths)",
            )
        return SlotState(start=depth)

    def prepare(self, state: SlotState, frame: Frame, limits: ServiceLimits) -> _Work:
        """Check a step's frame against the session and the limits, before it is queued."""
        hidden, mask = llm_step_inputs(frame)  # an absent mask is all ones
        batch, length, width = hidden.shape
        if width != self.hidden_size:
            raise FrameError(f"hidden size {width} does not match the model's {self.hidden_size}")
        if state.rows is not None and state.rows != batch:
            raise FrameError(f"batch size changed from {state.rows} to {batch} within the session")
        if batch > limits.max_batch or length > limits.max_step_tokens:
            raise ServiceError(
                413,
                "step_too_large",
                f"a step carries at most {limits.max_step_tokens} tokens in at most {limits.max_batch} rows "
                f"(got {length} tokens in {batch}); limits.max_step_tokens in /v1/info",
            )
        if state.seen + length > limits.max_tokens_per_session:
            raise ServiceError(
                422, "session_token_limit", f"a session holds at most {limits.max_tokens_per_session} tokens"
            )
        return _Work(state, hidden.to(self.trunk_dtype), mask.long())

    def step(self, state: SlotState, frame: Frame, limits: ServiceLimits) -> dict[str, torch.Tensor]:
        return self.step_as("", state, frame, limits)

    def step_as(
        self, owner: str, state: SlotState, frame: Frame, limits: ServiceLimits
    ) -> dict[str, torch.Tensor]:
        work = self.prepare(state, frame, limits)
        pool = self.pools.of(state)
        pool.hold(state)
        try:
            rows, tokens = work.hidden.shape[:2]
            out = self.scheduler.submit(owner, rows, tokens, work, group=state.start, key=state)
        except QueueTimeout as exc:
            raise ServiceError(
                503, "step_timeout", f"the server is overloaded: {exc}", retry_after=1
            ) from None
        finally:
            pool.finish(state)
        return {"hidden": out.float()}

    def _run(self, steps: Sequence[Step]) -> list[Any]:
        """One forward over the rows of ``steps`` (decode steps, or prefills of one length), all
        entering the trunk at the same layer (the scheduler batches one group at a time)."""
        results: list[Any] = [_gone() if s.payload.state.released else None for s in steps]
        works: list[_Work] = [s.payload for s, r in zip(steps, results, strict=True) if r is None]
        if not works:
            return results
        start = works[0].state.start
        if any(w.state.start != start for w in works):  # pragma: no cover - the scheduler groups by start
            raise RuntimeError("a batch mixes sessions of different head depths")
        with torch.inference_mode():
            batch = PoolBatch(self.pools[start], start, [(w.state, w.mask) for w in works])
            try:
                hidden = torch.cat([w.hidden for w in works])  # (R, T, C)
                out = self.trunk.forward_batch(hidden, batch, start=start)  # (R, T, C)
            except BaseException:
                batch.abort()
                raise
            batch.commit()
        outputs = iter(torch.split(out, [w.hidden.shape[0] for w in works]))
        return [next(outputs) if r is None else r for r in results]

    @property
    def trunk_dtype(self) -> torch.dtype:
        return next(iter(self.trunk.parameters()), torch.empty(0)).dtype

    def release(self, state: SlotState) -> None:
        self.scheduler.forget(state)
        self.pools.of(state).release(state)

    def state_bytes(self, state: SlotState) -> int:
        return self.pools.state_bytes(state)

    def state_tokens(self, state: SlotState) -> int:
        return state.seen

    def stats(self) -> dict[str, Any]:
        """Batch sizes, queue waits and KV pool occupancy (over every depth's pool), for /metrics."""
        return {
            **self.scheduler.stats.snapshot(),
            "queued": self.scheduler.queued,
            "slots_used": self.pools.used,
            "slots_total": self.pools.capacity,
            "slot_bytes_used": self.pools.bytes_used,
            "slot_bytes_total": self.pools.bytes_total,
        }

    def describe(self) -> dict[str, Any]:
        return {"kind": "llm", "hidden_size": self.hidden_size}


def _gone() -> ServiceError:
    return ServiceError(404, "session_not_found", "the session was closed during its step")


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
        self.executor = executor
        self.limits = limits or ServiceLimits()
        self._clock = clock
        self._sessions: OrderedDict[bytes, _Session] = OrderedDict()  # least recently used first
        self._lock = threading.Lock()
        self._compute = threading.Lock()
        self.evicted = 0
        self.expired = 0
        #: signs step receipts for sessions that ask (a ReceiptSigner; None: this server cannot)
        self.receipts: Any = None

    # -- bookkeeping ----------------------------------------------------------------------------
    @property
    def open_sessions(self) -> int:
        return len(self._sessions)

    @property
    def cache_bytes(self) -> int:
        return sum(session.nbytes for session in self._sessions.values())

    @property
    def batching(self) -> dict[str, Any] | None:
        """Batch sizes, queue waits and KV slot occupancy, if the executor batches steps."""
        return self.executor.stats() if isinstance(self.executor, BatchingExecutor) else None

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
        with self._lock:
            raw, session = self._lookup(owner, session_id)
            if session.busy:
                raise ServiceError(409, "session_busy", "a step of this session is already running")
            session.busy = True
        try:
            return self._step(raw, session, body)
        finally:
            with self._lock:
                session.busy = False
                session.last_used = self._clock()

    def _step(self, raw: bytes, session: _Session, body: bytes) -> bytes:
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
            if isinstance(self.executor, BatchingExecutor):
                outputs = self.executor.step_as(session.owner, session.state, frame, self.limits)
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
        return result if session.chain is None else session.chain.seal(frame.seq, body, result)

    def _enforce_memory(self, keep: bytes) -> None:
        while self.cache_bytes > self.limits.max_cache_bytes:
            victim = next((sid for sid, s in self._sessions.items() if sid != keep and not s.busy), None)
            if victim is None:
                break
            self._drop(victim)
            self.evicted += 1

    def _drop(self, sid: bytes) -> None:
        session = self._sessions.pop(sid)
        if isinstance(self.executor, BatchingExecutor):
            self.executor.release(session.state)

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


def load_llm_service(
    model: str | Checkpoint,
    split: str,
    *,
    security: str,
    limits: ServiceLimits | None = None,
    scheduling: SchedulerConfig | None = None,
    progress: Any = None,
    head_depths: str | None = None,
) -> tuple[TrunkService, dict[str, Any]]:
    """Load only the trunk of ``model`` and wrap it in a service; also return the /v1/info body.
    ``scheduling`` sets how steps of different sessions are batched (None: the defaults).
    ``head_depths`` (``LO:HI``, None: only A) lets sessions choose their head depth in that range
    (:mod:`lambda_split._head_depth`): the trunk then holds layers ``[LO, B)``."""
    from lambda_split._models import fingerprint, resolve
    from lambda_split._parts import SplitSpec, load_parts
    from lambda_split.protocol import PROTOCOL_VERSION, WIRE_ENCODINGS

    say = progress or (lambda _message: None)
    checkpoint = resolve(model) if isinstance(model, str) else model
    spec = SplitSpec.parse(split, int(checkpoint.config.num_hidden_layers))
    depths = HeadDepths(spec.start, spec.start) if head_depths is None else HeadDepths.parse(head_depths)
    depths.check_split(spec.start, spec.stop)
    held = SplitSpec(depths.lo, spec.stop, spec.num_layers)  # every session's layers, and no more
    say(f"loading trunk layers {held} of {checkpoint.name}")
    trunk = load_parts(checkpoint, held, ("trunk",)).trunk
    if trunk is None:  # pragma: no cover - load_parts always builds what it is asked for
        raise RuntimeError("trunk was not built")
    executor = LLMExecutor(trunk, scheduling, head_depths=depths, default_depth=spec.start)
    service = TrunkService(executor, limits=limits)
    prints = {d: fingerprint(checkpoint, (d, spec.stop)) for d in depths}
    info = {
        "model": checkpoint.name,
        "fingerprint": prints[spec.start],
        "split": [spec.start, spec.stop],
        "head_depths": [depths.lo, depths.hi],
        # the fingerprint of split d:B for each allowed d (the one a session at depth d is signed for)
        "head_depth_fingerprints": [prints[d] for d in depths],
        "num_layers": spec.num_layers,
        "hidden_size": int(checkpoint.config.hidden_size),
        "security": security,
        "protocol_version": PROTOCOL_VERSION,
        "kind": "llm",
        "wire_encodings": list(WIRE_ENCODINGS),
        "limits": service.limits.advertised(),
    }
    return service, info
