"""The LLM trunk on the server: :class:`LLMExecutor`, which batches the decode steps of many
sessions over KV slot pools, and :func:`load_llm_service`, which loads only the trunk's layers and
wraps them in a :class:`~lambda_split._service.TrunkService` with its ``/v1/info`` body.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from lambda_split._codec import Frame, FrameError, FrameKind
from lambda_split._head_depth import HeadDepths
from lambda_split._kvslots import PoolBatch, SlotPool, SlotPools, SlotState
from lambda_split._models import Checkpoint
from lambda_split._parts import Trunk
from lambda_split._scheduler import QueueTimeout, SchedulerConfig, Step, StepScheduler
from lambda_split._service import ServiceError, ServiceLimits, TrunkService
from lambda_split.protocol import llm_step_inputs


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
        self.trunk_dtype = next(iter(trunk.parameters()), torch.empty(0)).dtype  # steps arrive as fp32
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
