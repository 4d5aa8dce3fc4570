"""Processes of the deployment benchmark: ``lambda-split serve`` as a child, the link relay, and a pool of
client workers."""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import queue
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from lambda_split.cli.bench import _link
from lambda_split.cli.bench._clients import Target, worker_main

#: The benchmark measures compute and the wire, not throttling: request and handshake rates are lifted,
#: and there is room for every client's session.
SERVER_CONFIG = """\
[limits]
rate_limit_per_s = 1000000.0
rate_limit_burst = 1000000
handshake_rate_per_s = 1000000.0
handshake_burst = 1000000
max_sessions = 256
max_sessions_per_identity = 256
max_concurrency = 256
"""


class BenchError(RuntimeError):
    """A process of the benchmark failed to start or to answer."""


class ServerProcess:
    """``lambda-split serve`` in a child process, started at once; :meth:`ready` waits for its
    ``listening on URL`` line, so several servers load side by side. ``name`` (default: the mode)
    names its log, which a restart on the same ``port`` appends to."""

    def __init__(self, model: str, split: str, mode: str, keys: str, *, workdir: str,
                 threads: int | None, startup_s: float = 600.0, name: str | None = None,
                 port: int = 0) -> None:  # fmt: skip
        config = Path(workdir) / "server.toml"
        config.write_text(SERVER_CONFIG)
        command = [sys.executable, "-m", "lambda_split", "serve", "--model", model, "--split", split,
                   "--security", mode, "--port", str(port), "--config", str(config)]  # fmt: skip
        if mode != "plain":
            command += ["--keys", keys]
        env = dict(os.environ)
        if threads:
            env["OMP_NUM_THREADS"] = str(threads)
        self.mode = mode
        self.started_at = time.perf_counter()
        self.ready_at: float | None = None  # time.perf_counter() when ``listening on`` was read
        log_name = f"server-{(name or mode).replace('+', '-')}.log"
        self._log = open(Path(workdir) / log_name, "a")  # noqa: SIM115
        # a session of its own: a Ctrl-C meant for the benchmark does not stop the server under it
        self.child = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=self._log, text=True, env=env,
                                      start_new_session=True)  # fmt: skip
        self.pid = self.child.pid
        self._lines: queue.Queue[str] = queue.Queue()
        self._startup_s = startup_s
        self.url = ""
        threading.Thread(target=self._pump, args=(self._lines,), daemon=True).start()

    def ready(self) -> str:
        """Wait for ``listening on URL`` and return the URL (the server keeps loading meanwhile)."""
        if not self.url:
            self.url = self._wait_ready(self._lines, self._startup_s)
        return self.url

    def _pump(self, lines: queue.Queue[str]) -> None:
        assert self.child.stdout is not None
        for line in self.child.stdout:
            if self.ready_at is None and line.startswith("listening on "):
                self.ready_at = time.perf_counter()
            lines.put(line)
        lines.put("")

    def _wait_ready(self, lines: queue.Queue[str], startup_s: float) -> str:
        deadline = time.monotonic() + startup_s
        while True:
            try:
                line = lines.get(timeout=max(0.1, deadline - time.monotonic()))
            except queue.Empty:
                raise BenchError(
                    f"the {self.mode} server did not report ready within {startup_s:g} s"
                ) from None
            if line.startswith("listening on "):
                return line.split()[-1]
            if line == "" or time.monotonic() > deadline:
                code = self.child.poll()
                raise BenchError(f"the {self.mode} server exited before it was ready (exit code {code}): "
                                 f"{self._last_log_line()}")  # fmt: skip

    def _last_log_line(self) -> str:
        self._log.flush()
        try:
            lines = [line for line in Path(self._log.name).read_text().splitlines() if line.strip()]
        except OSError:
            return "no log"
        return lines[-1] if lines else "no output"

    @property
    def exit_code(self) -> int | None:
        return self.child.poll()

    def kill(self) -> tuple[float, float]:
        """SIGKILL, as a crash would, and wait for its exit; return when (``time.perf_counter()``) the
        signal was sent and when the process was reaped (its sockets closed by then)."""
        sent = time.perf_counter()
        self.child.kill()
        self.child.wait(30)
        reaped = time.perf_counter()
        self._log.close()
        return sent, reaped

    def stop(self) -> int | None:
        """SIGTERM, wait, and kill if it does not exit; return its exit code."""
        _stop(self.child, grace_s=30)
        self._log.close()
        return self.child.returncode


def _stop(child: subprocess.Popen[str], *, grace_s: float) -> None:
    """SIGTERM ``child``, give it ``grace_s`` to exit, then SIGKILL it; it is reaped either way."""
    if child.poll() is None:
        child.terminate()
        try:
            child.wait(grace_s)
        except subprocess.TimeoutExpired:
            child.kill()
            child.wait(10)


class LinkProcess:
    """The link relay (:mod:`._link`) in a child process, in front of the server at ``url`` (``http(s)://host:port``);
    :attr:`url` is the same URL through the relay. Use as a context manager."""

    def __init__(self, url: str, rtt_ms: float, *, startup_s: float = 30.0) -> None:
        parts = urlsplit(url)
        if parts.hostname is None or parts.port is None:
            raise ValueError(f"the server URL {url!r} names no host and port")
        # Run as a script: it imports only the standard library, so it starts in a moment.
        command = [sys.executable, str(Path(_link.__file__).resolve()), "--to", f"{parts.hostname}:{parts.port}",
                   "--rtt-ms", str(rtt_ms)]  # fmt: skip
        self.rtt_ms = rtt_ms
        self.child = subprocess.Popen(command, stdout=subprocess.PIPE, text=True, start_new_session=True)
        line: list[str] = []
        reader = threading.Thread(
            target=lambda: line.append(self.child.stdout.readline() if self.child.stdout else ""), daemon=True
        )
        reader.start()
        reader.join(startup_s)
        if not line or not line[0].startswith("listening on "):
            self.close()
            raise RuntimeError(f"the link relay did not start within {startup_s:g} s")
        relay_port = int(line[0].rsplit(":", 1)[1])
        # The server's certificate names localhost and 127.0.0.1; the relay listens on 127.0.0.1.
        self.url = urlunsplit((parts.scheme, f"{parts.hostname}:{relay_port}", parts.path, "", ""))

    def close(self) -> None:
        _stop(self.child, grace_s=10)
        if self.child.stdout is not None:
            self.child.stdout.close()

    def __enter__(self) -> LinkProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class ClientPool:
    """``count`` client processes (spawned) with the head and tail loaded, each connected to ``target``."""

    def __init__(self, count: int, model: str, split: str, target: Target, *, threads: int | None,
                 startup_s: float = 900.0, worker: Callable[..., None] = worker_main) -> None:  # fmt: skip
        context = multiprocessing.get_context("spawn")
        self._conns: list[Connection] = []
        self._procs: list[Any] = []
        try:
            for _ in range(count):
                mine, theirs = context.Pipe()
                proc = context.Process(target=worker, args=(model, split, target, threads, theirs),
                                       daemon=True)  # fmt: skip
                proc.start()
                theirs.close()
                self._conns.append(mine)
                self._procs.append(proc)
            self.pids = [int(self._receive(conn, startup_s)) for conn in self._conns]
        except BaseException:
            self.close()
            raise

    def _receive(self, conn: Connection, timeout_s: float) -> Any:
        if not conn.poll(timeout_s):
            raise BenchError(f"a client process did not answer within {timeout_s:g} s")
        try:
            status, value = conn.recv()
        except EOFError:
            raise BenchError("a client process exited unexpectedly") from None
        if status == "error":
            raise BenchError(f"a client process failed: {value}")
        return value

    def run(
        self,
        n: int,
        kind: str,
        wire: str,
        tokens: int,
        *,
        timeout_s: float = 900.0,
        targets: Sequence[Target] = (),
    ) -> list[dict[str, Any]]:
        """One generation on each of the first ``n`` clients, all starting at the same instant. With
        ``targets``, client ``i`` runs on ``targets[i % len(targets)]`` (else on the pool's server)."""
        go_at = time.perf_counter() + 0.05
        for index, conn in enumerate(self._conns[:n]):
            where = targets[index % len(targets)] if targets else None
            conn.send(("run", kind, wire, tokens, go_at, where))
        replies: list[Any] = []
        for conn in self._conns[:n]:  # every reply is read, so that a failure leaves no stale one behind
            try:
                replies.append(self._receive(conn, timeout_s))
            except BenchError as exc:
                replies.append(exc)
        for reply in replies:
            if isinstance(reply, BenchError):
                raise reply
        return replies

    def close(self) -> None:
        """Ask every worker to stop, give them 20 s in all, then kill what is left."""
        for conn in self._conns:
            with contextlib.suppress(OSError, ValueError):
                conn.send(("stop",))
        deadline = time.monotonic() + 20
        for proc in self._procs:
            proc.join(max(0.1, deadline - time.monotonic()))
        for proc in self._procs:
            if proc.is_alive():
                proc.kill()
                proc.join(10)
        for conn in self._conns:
            conn.close()
        self._conns.clear()
        self._procs.clear()
