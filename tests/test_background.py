"""ServerThread: the server thread behind BackgroundServer (trunk) and BackgroundLocal (local endpoint)."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

import pytest

from lambda_split._background import ServerThread


class FakeServer:
    """Runs until told to exit; says it is ready only if ``ready`` is set."""

    def __init__(self, on_ready: Callable[[str], None], ready: bool) -> None:
        self.on_ready, self.ready = on_ready, ready
        self.should_exit = False
        self.url = ""
        self.exited = threading.Event()

    def run(self) -> None:
        if self.ready:
            self.url = "http://127.0.0.1:1"
            self.on_ready(self.url)
        while not self.should_exit:
            time.sleep(0.01)
        self.exited.set()


def test_it_returns_once_the_server_listens_and_stops_it_on_exit() -> None:
    with ServerThread(
        lambda on_ready: FakeServer(on_ready, True), name="t", what="the fake", timeout_s=30
    ) as running:
        assert running.url == "http://127.0.0.1:1" and running.thread.is_alive()
    assert running.server.exited.is_set() and not running.thread.is_alive()


def test_a_server_that_never_listens_is_stopped_and_named() -> None:
    made: list[FakeServer] = []

    def build(on_ready: Callable[[str], None]) -> FakeServer:
        made.append(FakeServer(on_ready, False))
        return made[0]

    with pytest.raises(RuntimeError, match=r"the fake did not start within 0\.2 s"):
        ServerThread(build, name="t", what="the fake", timeout_s=0.2)
    assert made[0].exited.wait(5), "the thread is not left running"
