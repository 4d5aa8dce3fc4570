"""Continuous batching of trunk steps across sessions.

Who waits: every request thread, after :meth:`StepScheduler.enqueue`, waits for its step.
Who runs: whichever waiter finds nobody running becomes the runner. It takes what is queued
when the previous batch finishes (no timing constant), runs it as one forward, hands out the
results, and keeps running until its own step is done; then another waiter takes over.
What a step costs: a decode step (one new token per row) costs its rows, and decode steps of
different sessions share one forward up to ``max_rows`` rows. A prefill (several new tokens)
shares its forward only with prefills of the same length (same-length rows stack with no padding:
prompts bucketed by the client's ``prompt_bucket``, chunked prefills, a fleet of clients with one
template), up to ``max_rows`` rows and ``max_prefill_tokens`` tokens; when both kinds wait,
prefill and decode batches alternate, so a long prompt delays everyone's next token by at most
one prefill batch.

Gathering: clients in step with each other come back at about the same time, and the first to
arrive would otherwise run alone while the others queue behind it. So a runner about to start a
decode batch with fewer rows queued than the previous decode batch had waits for the rest, at most
``gather_fraction`` (default 1) of the previous forward's duration and never over ``max_gather_s``
(default 0.1 s): a gather that fails costs at most one forward's time, once (the next batch expects
only the rows that came), one that succeeds saves a whole forward. Steps that name their session
(``key``) are also expected back once their last step finished, within two forwards and a gather of
now: otherwise two sessions that fell out of step would run alone in turn for good, each batch
expecting only the one row it had. A single session never waits (its one row is all that is
expected); a closed session is forgotten (:meth:`StepScheduler.forget`). A queued prefill, or
:meth:`StepScheduler.drain`, does not wait.

Groups: a step may name a group (the trunk layer its session enters at); a batch holds steps of
one group only, the group of the step whose owner's turn comes first. A gather waits only for the
rows and sessions of that group: a session of another group would not share the batch anyway.

Fairness: owners (authenticated identities) take turns, one step each per round, and an
owner served moves to the back of the line, so many sessions of one identity cannot starve
another. A step not taken within ``deadline_s`` fails with :class:`QueueTimeout`.
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from lambda_split._buckets import Buckets


class QueueTimeout(Exception):
    """A step waited longer than the scheduler's deadline and was not run."""


@dataclass(frozen=True)
class SchedulerConfig:
    """``max_rows``: rows of one decode batch (a single step with more rows runs alone).
    ``deadline_s``: longest wait in the queue. Servers set them in ``[limits]`` as
    ``max_batch_rows`` and ``step_deadline_s``. ``max_prefill_tokens``: rows x tokens of one
    prefill batch (a single larger prefill runs alone)."""

    max_rows: int = 32
    deadline_s: float = 30.0
    max_prefill_tokens: int = 4096
    gather_fraction: float = 1.0
    max_gather_s: float = 0.1

    def __post_init__(self) -> None:
        if isinstance(self.max_rows, bool) or not isinstance(self.max_rows, int) or self.max_rows < 1:
            raise ValueError("max_rows must be a whole number, at least 1")
        if not 0 < self.deadline_s < float("inf"):  # NaN fails too
            raise ValueError("deadline_s must be a positive, finite number of seconds")
        if (
            isinstance(self.max_prefill_tokens, bool)
            or not isinstance(self.max_prefill_tokens, int)
            or self.max_prefill_tokens < 1
        ):
            raise ValueError("max_prefill_tokens must be a whole number, at least 1")
        if not 0 <= self.gather_fraction <= 1:
            raise ValueError("gather_fraction must be between 0 and 1")
        if not 0 <= self.max_gather_s < float("inf"):
            raise ValueError("max_gather_s must be 0 or more seconds, finite")


@dataclass(eq=False)
class Step:
    """One session's step: ``rows`` rows of ``tokens`` new tokens each; ``payload`` is the executor's."""

    owner: str
    rows: int
    tokens: int
    payload: Any
    submitted: float
    group: Any = None  # only steps of one group share a batch
    key: Any = None  # the session, expected back after this step (see the module doc); None: not tracked
    done: bool = False
    result: Any = None
    error: BaseException | None = None

    @property
    def is_prefill(self) -> bool:
        return self.tokens > 1


#: Upper bounds (seconds) of the queue-wait histogram in :class:`SchedulerStats`.
QUEUE_WAIT_BOUNDS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 5.0)


@dataclass
class SchedulerStats:
    """What the scheduler did: batch sizes in rows, time steps spent queued, deadline failures."""

    batch_rows: Counter[int] = field(default_factory=Counter)  # rows of a batch -> how many batches
    #: the wait of every step taken from the queue into a batch
    queue_waits: Buckets = field(default_factory=lambda: Buckets(QUEUE_WAIT_BOUNDS))
    gather_timeouts: int = 0  # decode batches started short after waiting the whole gather budget
    prefills: int = 0  # prefill steps
    prefill_batches: int = 0  # forwards that ran them (same-length prefills share one)
    queue_wait_s_max: float = 0.0
    steps: int = 0
    timeouts: int = 0

    def snapshot(self) -> dict[str, Any]:
        return {
            "batches": sum(self.batch_rows.values()),
            "batch_rows": dict(sorted(self.batch_rows.items())),
            "prefills": self.prefills,
            "prefill_batches": self.prefill_batches,
            "steps": self.steps,
            "queue_wait_s_total": self.queue_waits.total,
            "queue_wait_s_max": self.queue_wait_s_max,
            "taken": self.queue_waits.count,
            "gather_timeouts": self.gather_timeouts,
            "queue_wait_le": self.queue_waits.le(),
            "timeouts": self.timeouts,
        }

    def record_wait(self, wait: float) -> None:
        self.queue_waits.record(wait)
        self.queue_wait_s_max = max(self.queue_wait_s_max, wait)


#: Runs a batch; returns one result per step, or an exception instance for a step that failed.
RunBatch = Callable[[Sequence[Step]], Sequence[Any]]


class StepScheduler:
    """Queues steps of many sessions and runs them in batches through ``run_batch``."""

    def __init__(
        self,
        run_batch: RunBatch,
        config: SchedulerConfig | None = None,
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.config = config or SchedulerConfig()
        self.stats = SchedulerStats()
        self._run_batch = run_batch
        self._clock = clock
        self._queue: list[Step] = []  # arrival order
        self._turns: dict[str, None] = {}  # owners with queued steps, next to be served first
        self._running = False
        self._last_prefill = False
        # per group: rows of its last decode batch, which will come back for their next step
        self._expected_rows: dict[Any, int] = {}
        # session key -> (when its last step finished (monotonic), its group)
        self._recent: dict[Any, tuple[float, Any]] = {}
        self._last_forward_s = 0.0  # how long that batch took
        self._cond = threading.Condition()

    @property
    def queued(self) -> int:
        return len(self._queue)

    def submit(
        self, owner: str, rows: int, tokens: int, payload: Any, *, group: Any = None, key: Any = None
    ) -> Any:
        """Queue a step and wait for its result (raising its error, or :class:`QueueTimeout`)."""
        return self.wait(self.enqueue(owner, rows, tokens, payload, group=group, key=key))

    def enqueue(
        self, owner: str, rows: int, tokens: int, payload: Any, *, group: Any = None, key: Any = None
    ) -> Step:
        step = Step(owner, rows, tokens, payload, self._clock(), group, key)
        with self._cond:
            self._queue.append(step)
            self._turns.setdefault(owner, None)
            self._cond.notify_all()  # a runner may be gathering
        return step

    def wait(self, step: Step) -> Any:
        with self._cond:
            while not step.done and self._running:
                self._cond.wait()
            if not step.done:
                self._running = True
        if not step.done:
            self._lead(until=step)
        if step.error is not None:
            raise step.error
        return step.result

    def drain(self) -> None:
        """Run batches in this thread until the queue is empty (when nobody else is running)."""
        with self._cond:
            if self._running:
                raise RuntimeError("another thread is running the scheduler")
            self._running = True
        self._lead(until=None)

    # -- the runner -----------------------------------------------------------------------------
    def _lead(self, until: Step | None) -> None:
        try:
            while until is None or not until.done:
                with self._cond:
                    if until is not None:
                        self._gather()
                    batch = self._take()
                    self._cond.notify_all()  # steps that timed out are done
                if not batch:
                    break
                started = time.monotonic()
                self._run(batch)
                if not batch[0].is_prefill:
                    self._expected_rows[batch[0].group] = sum(s.rows for s in batch)
                    self._last_forward_s = time.monotonic() - started
        finally:
            with self._cond:
                self._running = False
                self._cond.notify_all()

    def _gather(self) -> None:
        """Under the lock: wait (bounded, see the module doc) for the rows of the last decode batch
        of the group that runs next."""
        budget = min(self.config.max_gather_s, self.config.gather_fraction * self._last_forward_s)
        end = time.monotonic() + budget
        while True:
            if any(s.is_prefill for s in self._queue):
                return
            if not self._queue:
                return
            group = self._first_in_turn(self._queue).group
            rows = sum(s.rows for s in self._queue if s.group == group)
            if rows >= self._expected_rows.get(group, 0) and not self._missing(group):
                return
            remaining = end - time.monotonic()
            if remaining <= 0:
                self.stats.gather_timeouts += 1
                return
            self._cond.wait(remaining)

    def _missing(self, group: Any) -> bool:
        """Under the lock: a session of ``group`` whose last step finished recently has no step queued."""
        horizon = 2 * self._last_forward_s + self.config.max_gather_s
        now = time.monotonic()
        for key in [k for k, (at, _) in self._recent.items() if now - at > horizon]:
            del self._recent[key]
        queued = {s.key for s in self._queue}
        return any(key not in queued for key, (_, g) in self._recent.items() if g == group)

    def forget(self, key: Any) -> None:
        """``key``'s session is closed: no gather waits for it any more."""
        with self._cond:
            self._recent.pop(key, None)

    def _take(self) -> list[Step]:
        """Choose the next batch (under the lock) and remove it from the queue."""
        now = self._clock()
        for step in [s for s in self._queue if now - s.submitted > self.config.deadline_s]:
            self._queue.remove(step)
            self.stats.timeouts += 1
            self._finish(step, error=QueueTimeout(f"the step waited over {self.config.deadline_s:g} s"))
        prefills = [s for s in self._queue if s.is_prefill]
        decodes = [s for s in self._queue if not s.is_prefill]
        if prefills and (not decodes or not self._last_prefill):
            batch = self._prefill_batch(prefills)
            self.stats.prefills += len(batch)
            self.stats.prefill_batches += 1
        else:
            if decodes:
                first = self._first_in_turn(decodes)
                decodes = [s for s in decodes if s.group == first.group]
            batch = self._round_robin(decodes)
        self._last_prefill = bool(batch) and batch[0].is_prefill
        for step in batch:
            self._queue.remove(step)
            self.stats.record_wait(now - step.submitted)
        if batch and not batch[0].is_prefill:
            self.stats.batch_rows[sum(s.rows for s in batch)] += 1
        for step in batch:  # served owners go to the back of the line
            self._turns.pop(step.owner, None)
            self._turns[step.owner] = None
        queued_owners = {s.owner for s in self._queue}
        for owner in [o for o in self._turns if o not in queued_owners]:
            del self._turns[owner]
        return batch

    def _first_in_turn(self, steps: list[Step]) -> Step:
        """Under the lock: the step of ``steps`` whose owner's turn comes first."""
        order = {owner: turn for turn, owner in enumerate(self._turns)}
        return min(steps, key=lambda s: order[s.owner])

    def _prefill_batch(self, prefills: list[Step]) -> list[Step]:
        """The first prefill in turn order, and after it the queued prefills of the same length (taken
        in turns, one per owner per round, as decodes are) that fit in ``max_rows`` and ``max_prefill_tokens``."""
        first = self._first_in_turn(prefills)
        same = self._round_robin(
            [s for s in prefills if s.tokens == first.tokens and s.group == first.group], limit=False
        )
        batch, rows = [first], first.rows
        for step in same[1:]:  # same[0] is first: its owner's turn comes first
            if rows + step.rows > self.config.max_rows:
                continue
            if (rows + step.rows) * first.tokens > self.config.max_prefill_tokens:
                continue
            batch.append(step)
            rows += step.rows
        return batch

    def _round_robin(self, decodes: list[Step], *, limit: bool = True) -> list[Step]:
        by_owner: dict[str, list[Step]] = {owner: [] for owner in self._turns}
        for step in decodes:
            by_owner[step.owner].append(step)
        batch: list[Step] = []
        rows = 0
        while any(by_owner.values()):
            for waiting in by_owner.values():
                if not waiting:
                    continue
                if limit and batch and rows + waiting[0].rows > self.config.max_rows:
                    return batch
                step = waiting.pop(0)
                batch.append(step)
                rows += step.rows
        return batch

    def _run(self, batch: list[Step]) -> None:
        try:
            results = list(self._run_batch(batch))
        except Exception as exc:
            if len(batch) > 1:  # run them one by one, so that a failure stays with its own step
                for step in batch:
                    self._run([step])
                return
            results = [exc]
        with self._cond:
            now = time.monotonic()
            for step in batch:
                if step.key is not None:
                    self._recent[step.key] = (now, step.group)
            for step, result in zip(batch, results, strict=True):
                if isinstance(result, BaseException):
                    self._finish(step, error=result)
                else:
                    self._finish(step, result=result)
            self._cond.notify_all()

    def _finish(self, step: Step, *, result: Any = None, error: BaseException | None = None) -> None:
        step.result, step.error, step.done = result, error, True
        self.stats.steps += 1
