"""The batching scheduler: who runs with whom, fairness, deadlines and failure isolation.

An injected ``run_batch`` records the batches and a fake clock stands in for time, so nothing
here depends on timing or threads.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from typing import Any

import pytest

from lambda_split._scheduler import QueueTimeout, SchedulerConfig, Step, StepScheduler


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


class Recorder:
    """Runs a batch by echoing each payload; fails the whole batch if it holds a payload "bad"."""

    def __init__(self) -> None:
        self.batches: list[list[Any]] = []

    def __call__(self, steps: Sequence[Step]) -> list[Any]:
        payloads = [s.payload for s in steps]
        self.batches.append(payloads)
        if "bad" in payloads:
            raise RuntimeError("this row cannot run")
        return payloads


def scheduler(max_rows: int = 8, deadline_s: float = 30.0) -> tuple[StepScheduler, Recorder, Clock]:
    recorder, clock = Recorder(), Clock()
    return StepScheduler(recorder, SchedulerConfig(max_rows, deadline_s), clock=clock), recorder, clock


def test_decode_steps_of_different_sessions_share_one_batch() -> None:
    sched, runs, _ = scheduler()
    steps = [sched.enqueue(f"owner{i}", 1, 1, f"s{i}") for i in range(5)]
    sched.drain()
    assert runs.batches == [["s0", "s1", "s2", "s3", "s4"]]
    assert [s.result for s in steps] == ["s0", "s1", "s2", "s3", "s4"]
    assert sched.stats.batch_rows == {5: 1}


def test_batches_are_capped_in_rows_and_a_session_keeps_its_rows_together() -> None:
    sched, runs, _ = scheduler(max_rows=4)
    for i, rows in enumerate([3, 2, 1, 4]):
        sched.enqueue(f"o{i}", rows, 1, f"s{i}")
    sched.drain()
    assert runs.batches == [["s0"], ["s1", "s2"], ["s3"]]
    assert all(sum([3, 2, 1, 4][int(p[1])] for p in batch) <= 4 for batch in runs.batches)


def test_one_identity_with_many_sessions_cannot_starve_another() -> None:
    sched, runs, _ = scheduler(max_rows=2)
    for i in range(6):
        sched.enqueue("greedy", 1, 1, f"g{i}")
    sched.enqueue("modest", 1, 1, "m0")
    sched.drain()
    assert runs.batches[0] == ["g0", "m0"]  # the late arrival rides in the very first batch
    # Round robin: with both owners waiting, each batch holds one step of each.
    sched2, runs2, _ = scheduler(max_rows=2)
    for i in range(4):
        sched2.enqueue("greedy", 1, 1, f"g{i}")
    for i in range(2):
        sched2.enqueue("modest", 1, 1, f"m{i}")
    sched2.drain()
    assert runs2.batches[:2] == [["g0", "m0"], ["g1", "m1"]]


def test_prefills_of_other_lengths_run_apart_and_alternate_with_decode_batches() -> None:
    sched, runs, _ = scheduler()
    for i in range(3):
        sched.enqueue(f"p{i}", 1, 50 + i, f"prefill{i}")
    for i in range(3):
        sched.enqueue(f"d{i}", 1, 1, f"decode{i}")
    sched.drain()
    assert runs.batches == [
        ["prefill0"],
        ["decode0", "decode1", "decode2"],
        ["prefill1"],
        ["prefill2"],  # nobody is decoding any more: nothing to alternate with
    ]
    assert sched.stats.prefills == 3 and sched.stats.prefill_batches == 3
    assert sched.stats.batch_rows == {3: 1}


def test_prefills_of_one_length_share_a_forward_within_rows_and_tokens() -> None:
    recorder = Recorder()
    sched = StepScheduler(recorder, SchedulerConfig(max_rows=4, max_prefill_tokens=150), clock=Clock())
    sched.enqueue("a", 1, 50, "a50")
    sched.enqueue("b", 1, 40, "b40")  # another length: its own forward
    sched.enqueue("a", 1, 50, "a50'")
    sched.enqueue("c", 3, 50, "c50x3")  # would make 4 rows x 50 = 200 tokens > 150
    sched.enqueue("d", 1, 50, "d50")
    sched.enqueue("e", 1, 1, "decode")
    sched.drain()
    # Same length, one per owner per round (a's second prefill after d's), within 150 tokens.
    assert recorder.batches == [["a50", "d50", "a50'"], ["decode"], ["b40"], ["c50x3"]]
    assert sched.stats.prefills == 5 and sched.stats.prefill_batches == 3


def test_a_step_waiting_past_its_deadline_fails_and_is_not_run() -> None:
    sched, runs, clock = scheduler(deadline_s=30)
    old = sched.enqueue("a", 1, 1, "old")
    clock.now = 20
    young = sched.enqueue("b", 1, 1, "young")
    clock.now = 31
    with pytest.raises(QueueTimeout):
        sched.wait(old)
    assert sched.wait(young) == "young"
    assert runs.batches == [["young"]]
    assert sched.stats.timeouts == 1 and sched.stats.queue_wait_s_max == 11


def test_a_failing_row_fails_alone() -> None:
    sched, runs, _ = scheduler()
    good = [sched.enqueue("a", 1, 1, "x"), sched.enqueue("b", 1, 1, "bad"), sched.enqueue("c", 1, 1, "y")]
    sched.drain()
    assert runs.batches == [["x", "bad", "y"], ["x"], ["bad"], ["y"]]  # the batch is retried row by row
    assert good[0].result == "x" and good[2].result == "y"
    assert isinstance(good[1].error, RuntimeError)


def test_the_waiter_that_finds_nobody_running_runs_everyone_queued() -> None:
    sched, runs, _ = scheduler()
    other = sched.enqueue("a", 1, 1, "queued earlier")
    assert sched.submit("b", 1, 1, "mine") == "mine"
    assert other.done and other.result == "queued earlier"
    assert runs.batches == [["queued earlier", "mine"]]


def test_config_is_validated() -> None:
    for bad in ({"max_rows": 0}, {"deadline_s": 0}):
        with pytest.raises(ValueError):
            SchedulerConfig(**bad)  # type: ignore[arg-type]


def test_request_threads_queue_behind_the_runner_and_one_of_them_takes_over() -> None:
    go = threading.Event()
    batches: list[list[str]] = []

    def run(steps: Sequence[Step]) -> list[str]:
        payloads = [s.payload for s in steps]
        batches.append(payloads)
        if payloads == ["first"]:
            go.wait()
        return [p.upper() for p in payloads]

    sched = StepScheduler(run)
    results: dict[str, str] = {}

    def client(name: str) -> None:
        results[name] = sched.submit(name, 1, 1, name)

    threads = [threading.Thread(target=client, args=("first",))]
    threads[0].start()
    while not batches:  # the first step is running and holds the runner
        go.wait(0.001)
    threads += [threading.Thread(target=client, args=(name,)) for name in ("second", "third")]
    for thread in threads[1:]:
        thread.start()
    while sched.queued < 2:
        go.wait(0.001)
    go.set()
    for thread in threads:
        thread.join()
    assert batches == [["first"], ["second", "third"]]
    assert results == {"first": "FIRST", "second": "SECOND", "third": "THIRD"}


def test_queue_waits_are_counted_by_bound_for_the_metrics() -> None:
    sched, _, clock = scheduler()
    sched.enqueue("a", 1, 1, "early")
    clock.now = 0.02  # "early" has waited 20 ms when the batch is taken
    sched.enqueue("b", 1, 1, "late")
    sched.drain()
    snap = sched.stats.snapshot()
    assert snap["taken"] == 2 and snap["queue_wait_s_max"] == pytest.approx(0.02)
    assert snap["queue_wait_le"][0.001] == 1 and snap["queue_wait_le"][0.01] == 1
    assert snap["queue_wait_le"][0.025] == 2 and snap["queue_wait_le"][5.0] == 2
    assert snap["queue_wait_s_total"] == pytest.approx(0.02)


@pytest.mark.parametrize(("rows", "deadline"), [(0, 1.0), (1, 0.0), (1, float("nan")), (1, float("inf"))])
def test_bad_scheduler_settings_are_refused(rows: int, deadline: float) -> None:
    with pytest.raises(ValueError, match=r"max_rows|deadline_s"):
        SchedulerConfig(rows, deadline)
    with pytest.raises(ValueError, match="max_prefill_tokens"):
        SchedulerConfig(max_prefill_tokens=0)


class _SpyCondition(threading.Condition):
    """Notes when the runner waits with a timeout (it is gathering)."""

    def __init__(self) -> None:
        super().__init__()
        self.gathering = threading.Event()

    def wait(self, timeout: float | None = None) -> bool:
        if timeout is not None:
            self.gathering.set()
        return super().wait(timeout)


def _gathering_scheduler(max_gather_s: float) -> tuple[StepScheduler, Recorder, _SpyCondition]:
    recorder = Recorder()
    sched = StepScheduler(recorder, SchedulerConfig(8, 30.0, gather_fraction=1.0, max_gather_s=max_gather_s))
    spy = _SpyCondition()
    sched._cond = spy
    sched.enqueue("a", 1, 1, "a0")
    sched.enqueue("b", 1, 1, "b0")
    sched.drain()  # a decode batch of two rows: both are expected back
    sched._last_forward_s = 3600.0  # as if that forward took long: the budget is max_gather_s
    return sched, recorder, spy


def test_a_runner_waits_for_the_rows_of_the_last_decode_batch() -> None:
    sched, runs, spy = _gathering_scheduler(max_gather_s=600.0)
    first = sched.enqueue("a", 1, 1, "a1")
    runner = threading.Thread(target=sched.wait, args=(first,))
    runner.start()
    assert spy.gathering.wait(10), "the runner waits for the second row instead of running alone"
    second = sched.enqueue("b", 1, 1, "b1")  # arrives while the runner gathers
    runner.join(60)
    sched.wait(second)
    assert runs.batches == [["a0", "b0"], ["a1", "b1"]]
    assert sched.stats.gather_timeouts == 0


def test_a_gather_is_bounded_and_a_prefill_never_waits() -> None:
    sched, runs, spy = _gathering_scheduler(max_gather_s=0.01)
    assert sched.submit("a", 1, 1, "a1") == "a1"  # nobody else comes back: runs alone after the budget
    assert runs.batches[-1] == ["a1"] and sched.stats.gather_timeouts == 1
    spy.gathering.clear()
    sched._expected_rows[None] = 2  # a row is missing, but a prefill is queued: no wait
    assert sched.submit("a", 1, 5, "prefill") == "prefill"
    assert not spy.gathering.is_set()


def _out_of_step(max_gather_s: float) -> tuple[StepScheduler, Recorder, _SpyCondition]:
    """Two sessions that fell out of step: each ran alone, so the last batch had one row."""
    recorder = Recorder()
    sched = StepScheduler(recorder, SchedulerConfig(8, 30.0, gather_fraction=1.0, max_gather_s=max_gather_s))
    spy = _SpyCondition()
    sched._cond = spy
    for key in ("A", "B"):
        sched.enqueue("owner", 1, 1, f"{key}0", key=key)
        sched.drain()
    sched._last_forward_s = 3600.0  # the budget is max_gather_s, and both sessions are recent
    return sched, recorder, spy


def test_sessions_that_fell_out_of_step_are_gathered_back_into_one_batch() -> None:
    sched, runs, spy = _out_of_step(max_gather_s=600.0)
    assert runs.batches == [["A0"], ["B0"]]
    first = sched.enqueue("owner", 1, 1, "A1", key="A")
    runner = threading.Thread(target=sched.wait, args=(first,))
    runner.start()
    assert spy.gathering.wait(10), "the runner waits for B, whose last step just finished"
    second = sched.enqueue("owner", 1, 1, "B1", key="B")
    runner.join(60)
    sched.wait(second)
    assert runs.batches[-1] == ["A1", "B1"] and sched.stats.gather_timeouts == 0


def test_a_forgotten_session_is_not_waited_for() -> None:
    sched, runs, spy = _out_of_step(max_gather_s=600.0)
    sched.forget("B")  # B's session closed
    assert sched.submit("owner", 1, 1, "A1", key="A") == "A1"
    assert runs.batches[-1] == ["A1"] and not spy.gathering.is_set()


def test_a_gather_waits_only_for_sessions_of_the_group_that_runs_next() -> None:
    """Sessions at another head depth would not share the batch: waiting for them wastes the gather."""
    recorder = Recorder()
    sched = StepScheduler(recorder, SchedulerConfig(8, 30.0, gather_fraction=1.0, max_gather_s=600.0))
    spy = _SpyCondition()
    sched._cond = spy
    sched.enqueue("a", 1, 1, "A0", group=2, key="A")
    sched.enqueue("b", 1, 1, "B0", group=2, key="B")
    sched.drain()  # two rows at depth 2, both recent
    sched.enqueue("c", 1, 1, "C0", group=3, key="C")
    sched.drain()  # one row at depth 3
    sched._last_forward_s = 0.5  # a gather could wait half a second; A and B stay recent
    assert sched.submit("c", 1, 1, "C1", group=3, key="C") == "C1"  # A and B are of depth 2
    assert recorder.batches[-1] == ["C1"] and not spy.gathering.is_set()
    sched._last_forward_s = 3600.0  # as before: that forward's real time would end the gather at once
    first = sched.enqueue("a", 1, 1, "A1", group=2, key="A")
    runner = threading.Thread(target=sched.wait, args=(first,))
    runner.start()
    assert spy.gathering.wait(10), "depth 2 ran two rows last time: the runner waits for B"
    second = sched.enqueue("b", 1, 1, "B1", group=2, key="B")
    runner.join(60)
    sched.wait(second)
    assert recorder.batches[-1] == ["A1", "B1"] and sched.stats.gather_timeouts == 0
