"""Real nginx in front of real ``lambda-split serve`` replicas, all on loopback, all stopped after.

nginx runs unprivileged from a temporary prefix (``nginx -p DIR -c DIR/nginx.conf -e
DIR/error.log -g 'daemon off;'``) with a configuration rendered from ``deploy/nginx/*.conf.in``;
each replica is a subprocess that prints ``listening on URL``. A missing nginx fails the test.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

import pytest

from secure_channel import Request, Response, Stream, Transport

ROOT = Path(__file__).resolve().parents[2]
TEMPLATES = ROOT / "deploy" / "nginx"
STREAM_MODULE = Path("/usr/lib/nginx/modules/ngx_stream_module.so")
DEBIAN_NGINX = Path("/usr/sbin/nginx")  # not on a non-root PATH
INSTALL = "install it with `make system-packages` (apt-get install nginx libnginx-mod-stream)"
STARTUP_S = 180.0


def nginx_binary() -> str:
    """The nginx executable; a clear failure (never a skip) when it is not installed."""
    found = shutil.which("nginx") or (str(DEBIAN_NGINX) if DEBIAN_NGINX.exists() else None)
    if found is None:
        pytest.fail(f"nginx is not installed: the reverse-proxy tests need it; {INSTALL}")
    return found


def render(template: str, values: Mapping[str, str]) -> str:
    """``deploy/nginx/<template>.conf.in`` with every ``@NAME@`` replaced; unknown names fail."""
    text = (TEMPLATES / f"{template}.conf.in").read_text()
    for name, value in values.items():
        text = text.replace(f"@{name}@", value)
    left = re.findall(r"@[A-Z_]+@", text)
    if left:
        raise AssertionError(f"{template}: placeholders left unrendered: {sorted(set(left))}")
    return text


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _wait_port(port: int, alive: Callable[[], bool], timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and alive():
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=1):
            return True
        time.sleep(0.05)
    return False


@dataclass
class Replica:
    """One ``lambda-split serve`` subprocess; its JSON log lines go to ``log``."""

    process: subprocess.Popen[str]
    url: str
    log: Path

    @property
    def address(self) -> str:
        parts = urlsplit(self.url)
        return f"{parts.hostname}:{parts.port}"

    @classmethod
    def start(
        cls, mode: str, keys: Path, log: Path, env: Mapping[str, str] | None = None, port: int = 0
    ) -> Replica:
        return cls.start_many(mode, keys, [log], env, port)[0]

    @classmethod
    def start_many(
        cls, mode: str, keys: Path, logs: list[Path], env: Mapping[str, str] | None = None, port: int = 0
    ) -> list[Replica]:
        """One replica per log file, loading their models side by side (on ``port``: one only)."""
        clean = {k: v for k, v in os.environ.items() if not k.startswith("LAMBDA_SPLIT_")}
        argv = [sys.executable, "-m", "lambda_split", "serve", "--model", "tiny-random-llama",
                "--split", "2:-2", "--security", mode, "--keys", str(keys), "--port", str(port)]  # fmt: skip
        processes = []
        for log in logs:
            with log.open("a") as err:
                processes.append(
                    subprocess.Popen(
                        argv, stdout=subprocess.PIPE, stderr=err, text=True, env={**clean, **(env or {})}
                    )
                )
        lines: dict[int, str] = {}

        def read(number: int, process: subprocess.Popen[str]) -> None:
            lines[number] = process.stdout.readline() if process.stdout else ""

        readers = [threading.Thread(target=read, args=pair) for pair in enumerate(processes)]
        for reader in readers:
            reader.start()
        for reader in readers:
            reader.join(STARTUP_S)
        started = [
            cls(p, lines[n].split()[-1], logs[n])
            for n, p in enumerate(processes)
            if lines.get(n, "").startswith("listening on ")
        ]
        if len(started) != len(processes):
            for process in processes:
                process.kill()
                process.wait(10)
            tails = "\n".join(log.read_text()[-1000:] for log in logs)
            raise AssertionError(f"replicas did not start: {lines!r}\n{tails}")
        return started

    def signal(self, sig: int = signal.SIGTERM) -> None:
        if self.process.poll() is None:
            self.process.send_signal(sig)

    def stop(self, timeout: float = 60.0) -> int:
        """SIGTERM, then SIGKILL if it has not exited within ``timeout``; the exit code."""
        self.signal(signal.SIGTERM)
        try:
            return self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            return self.process.wait(10)
        finally:
            if self.process.stdout is not None:
                self.process.stdout.close()


@dataclass
class Nginx:
    """nginx from a temporary prefix, listening on ``port``."""

    process: subprocess.Popen[bytes]
    prefix: Path
    port: int

    @classmethod
    def start(cls, template: str, prefix: Path, upstreams: list[str], **values: str) -> Nginx:
        binary = nginx_binary()
        if template == "tls-passthrough" and not STREAM_MODULE.exists():
            pytest.fail(f"nginx's stream module {STREAM_MODULE} is not installed; {INSTALL}")
        prefix.mkdir(parents=True, exist_ok=True)
        servers = "\n        ".join(f"server {u} max_fails=1 fail_timeout=2s;" for u in upstreams)
        for _ in range(5):  # the port is free when chosen; another process may take it first
            port = free_port()
            conf = prefix / "nginx.conf"
            conf.write_text(render(template, {"LISTEN": f"127.0.0.1:{port}", "UPSTREAM_SERVERS": servers,
                                              "STREAM_MODULE": str(STREAM_MODULE), **values}))  # fmt: skip
            argv = [binary, "-p", str(prefix), "-c", str(conf), "-e", str(prefix / "error.log"),
                    "-g", "daemon off;"]  # fmt: skip
            process = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
            if _wait_port(port, lambda p=process: p.poll() is None, 20):
                return cls(process, prefix, port)
            process.kill()
            _, err = process.communicate(timeout=10)
            if b"Address already in use" not in err + _read(prefix / "error.log"):
                raise AssertionError(f"nginx did not start: {err.decode(errors='replace')}")
        raise AssertionError("nginx found no free port")

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGQUIT)  # graceful: finish what is in flight
            try:
                self.process.wait(15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)
        if self.process.stderr is not None:
            self.process.stderr.close()

    def access_log(self) -> list[dict[str, str]]:
        """The access log lines as ``key=value`` fields (route, upstream, ...) plus the status."""
        entries = []
        for line in _read(self.prefix / "access.log").decode().splitlines():
            fields = dict(re.findall(r"(\w+)=(\S*)", line))
            status = re.search(r"\] (?:\"[^\"]*\" )?(\d{3}) ", line)
            fields["status"] = status.group(1) if status else ""
            fields["line"] = line
            entries.append(fields)
        return entries


def _read(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        return b""


@dataclass
class Deployment:
    """nginx and its replicas; stops all of them."""

    mode: str
    nginx: Nginx
    replicas: list[Replica]
    url: str
    keys: Path
    proxy_ca: Path | None = None
    extra: dict[str, str] = field(default_factory=dict)

    def replica_at(self, address: str) -> Replica:
        return next(r for r in self.replicas if r.address == address)

    def restart(self, replica: Replica) -> Replica:
        """A new process for ``replica`` (stopped) on its port, in its place in the pool."""
        port = int(replica.address.rsplit(":", 1)[1])
        fresh = Replica.start(self.mode, self.keys, replica.log, port=port)
        self.replicas[self.replicas.index(replica)] = fresh
        return fresh

    def stop(self) -> list[int]:
        self.nginx.stop()
        return [replica.stop() for replica in self.replicas]


class Tap(Transport):
    """Wraps a client transport: counts its messages and runs ``on_message(n)`` before the n-th
    (HTTP request or stream message), and keeps the plaintext bodies it carried."""

    def __init__(self, inner: Transport, on_message: Callable[[int], None] = lambda n: None) -> None:
        self.inner, self.on_message = inner, on_message
        self.security, self.stats = inner.security, inner.stats
        self.messages = 0
        self.bodies: list[bytes] = []

    @property
    def route(self) -> str:  # type: ignore[override]
        return self.inner.route

    def _count(self, body: bytes) -> None:
        self.messages += 1
        self.on_message(self.messages)
        self.bodies.append(body)

    def exchange(self, request: Request) -> Response:
        self._count(request.content)
        return self.inner.exchange(request)

    def open_stream(self, path: str, headers: Mapping[str, str] | None = None) -> Stream:
        return _TapStream(self, self.inner.open_stream(path, headers))

    def close(self) -> None:
        self.inner.close()


class _TapStream(Stream):
    def __init__(self, tap: Tap, inner: Stream) -> None:
        self.tap, self.inner, self.stats = tap, inner, inner.stats

    def send(self, message: bytes) -> None:
        self.tap._count(message)
        self.inner.send(message)

    def recv(self) -> bytes:
        return self.inner.recv()

    def close(self) -> None:
        self.inner.close()


def wait_exit(replica: Replica, timeout: float) -> int | None:
    try:
        return replica.process.wait(timeout)
    except subprocess.TimeoutExpired:
        return None
