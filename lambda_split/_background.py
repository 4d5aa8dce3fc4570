"""A server on a thread of this process: started, awaited until it listens, stopped (tests, demo, benchmarks)."""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Generic, Protocol, Self, TypeVar


class _Server(Protocol):
    """What a uvicorn-based server of this project offers: ``run()``, ``should_exit``, ``force_exit`` and its ``url``."""

    should_exit: bool
    force_exit: bool
    url: str

    def run(self) -> None: ...


S = TypeVar("S", bound=_Server)


class ServerThread(Generic[S]):
    """``build(on_ready)`` makes the server, which calls ``on_ready(url)`` once it listens; it then runs
    on a daemon thread named ``name``. The constructor returns when it listens, or stops it and raises
    RuntimeError naming ``what`` after ``timeout_s``. Use as a context manager, or call :meth:`stop`."""

    def __init__(
        self, build: Callable[[Callable[[str], None]], S], *, name: str, what: str, timeout_s: float
    ) -> None:
        ready = threading.Event()
        self.server = build(lambda _url: ready.set())
        self.thread = threading.Thread(target=self.server.run, name=name, daemon=True)
        self.thread.start()
        if not ready.wait(timeout_s):
            self.stop()
            raise RuntimeError(f"{what} did not start within {timeout_s:g} s")
        self.url = self.server.url

    def stop(self) -> None:
        """Ask the server to finish, then to exit at once if it has not within 15 s; raise if it still runs."""
        self.server.should_exit = True
        self.thread.join(15)
        if self.thread.is_alive():
            self.server.force_exit = True
            self.thread.join(15)
            if self.thread.is_alive():
                raise RuntimeError(f"{self.thread.name} did not stop")

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
