"""Failover through nginx: a replica killed mid-generation, and a rolling restart of every replica.

The client (``SplitClient.connect`` with failover on) knows one URL, the proxy's. When its
replica dies, it opens a new transport (a new routing key) to the proxy, which sends it to a live
replica (the dead one refuses connections: ``proxy_next_upstream``), and replays its history.
"""

from __future__ import annotations

import signal
import threading
import time
from collections.abc import Callable

import pytest

from lambda_split import Checkpoint, FailoverPolicy, GenerationConfig, SplitClient
from secure_channel import Transport
from tests.scaleout.conftest import connect
from tests.scaleout.harness import Deployment, Replica, Tap, wait_exit

pytestmark = pytest.mark.heavy
GREEDY = GenerationConfig(max_new_tokens=12, temperature=0.0)
PROMPT = "the quick brown fox jumps over the lazy dog"
#: Patient enough to outlast a drain: a new key may hash to the draining replica a few times.
PATIENT = FailoverPolicy(attempts=12, deadline_s=120.0, backoff_s=0.25, max_backoff_s=2.0)


def client(
    deployment: Deployment, tiny: Checkpoint, kind: str, wrap: Callable[[Transport], Transport] = lambda t: t
) -> SplitClient:
    return SplitClient.connect(
        deployment.url,
        security=deployment.mode,  # type: ignore[arg-type]
        keys=deployment.keys,
        model=tiny,
        transport_kind=kind,  # type: ignore[arg-type]
        failover=PATIENT,
        transport_factory=lambda url: wrap(connect(deployment, url)),
    )


def until(condition: Callable[[], bool], what: str, timeout: float = 300.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"gave up waiting for {what}")
        time.sleep(0.1)


def opened(deployment: Deployment) -> dict[str, int]:
    return {r.address: r.log.read_text().count('"session opened"') for r in deployment.replicas}


@pytest.mark.parametrize(("mode", "kind"), [("aesgcm", "http"), ("tls", "stream")])
def test_kill_9_of_a_replica_mid_generation_keeps_every_token(
    make_deployment: Callable[..., Deployment], tiny: Checkpoint, mode: str, kind: str
) -> None:
    deployment = make_deployment(mode)
    with client(deployment, tiny, kind) as undisturbed:
        expected = undisturbed.generate(PROMPT, GREEDY).token_ids
    before = opened(deployment)
    killed: list[Replica] = []

    def kill_the_holder(message: int) -> None:
        if message == 6 and not killed:
            now = opened(deployment)
            holder = next(r for r in deployment.replicas if now[r.address] > before[r.address])
            holder.signal(signal.SIGKILL)
            holder.process.wait(30)
            killed.append(holder)

    with client(deployment, tiny, kind, wrap=lambda t: Tap(t, kill_the_holder)) as disturbed:
        assert disturbed.generate(PROMPT, GREEDY).token_ids == expected
        assert disturbed.failovers == 1
    assert len(killed) == 1 and killed[0].process.returncode == -signal.SIGKILL


def test_a_rolling_restart_of_every_replica_loses_no_generation(
    make_deployment: Callable[..., Deployment], tiny: Checkpoint
) -> None:
    deployment = make_deployment("aesgcm")
    with client(deployment, tiny, "http") as undisturbed:
        expected = undisturbed.generate(PROMPT, GREEDY).token_ids
    results: list[object] = []
    done = threading.Event()

    def generate_until_done() -> None:
        with client(deployment, tiny, "http") as busy:
            while not done.is_set():
                try:
                    results.append(busy.generate(PROMPT, GREEDY).token_ids)
                except Exception as exc:  # reported below, with the tokens
                    results.append(exc)

    worker = threading.Thread(target=generate_until_done)
    worker.start()
    try:
        for replica in list(deployment.replicas):
            until(lambda: len(results) >= 1, "a first generation")
            count = len(results)
            replica.signal(signal.SIGTERM)
            assert wait_exit(replica, 90) == 0  # drained, then exited 0
            deployment.restart(replica)
            until(lambda n=count: len(results) > n, "a generation with the replica back")
    finally:
        done.set()
        worker.join(300)
    assert not worker.is_alive()
    assert len(results) >= 3
    assert all(r == expected for r in results), [r for r in results if r != expected]
