"""Where the round trip of a split decode step goes, segment by segment, device and server alike.

    OMP_NUM_THREADS=1 python benchmarks/decode_segments.py [--security tls+aesgcm] [--tokens 64] [--runs 2]
    python benchmarks/decode_segments.py --floor

The trunk server runs in a process of its own (this script, ``--serve-child``: ``lambda-split
serve``'s service and server); this process is the device. Both stamp ``time.perf_counter()``,
one monotonic clock for every process of a machine, at the edges of each part of a decode step:

- device: the trunk call (``RemoteTrunk.__call__``), the WebSocket send and receive, head and tail;
- server: the stream's wait for a message (``_next``), its handler, ``TrunkService.step`` and the
  batch's forward (``LLMExecutor._run``, with the KV slot bookkeeping of the batch).

The stamps of a step, merged in time order, give its segments; the table prints the median of each
over the decode steps after the first two. ``overhead`` is a step's time less the server's forward,
the head and the tail: what the split adds to the three parts' compute.

``--floor`` measures the bare floor under it: two Python processes exchanging a 1,200-byte message
over loopback TCP, with a 40 ms wait on the server (a forward) and 16 ms on the device (a head and a
tail) as in the split, with and without a hand-off to a worker thread on the server.
"""

from __future__ import annotations

import argparse
import itertools
import os
import queue
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

MODEL, SPLIT = "smollm2-135m", "2:-2"
Stamps = list[tuple[str, float]]


def _stamp(owner: Any, name: str, tag: str, into: Stamps) -> None:
    """Wrap ``owner.name`` (sync or async) to append ``(tag>, t)`` and ``(tag<, t)`` around each call."""
    inner = getattr(owner, name)
    clock = time.perf_counter
    if _is_async(inner):

        async def timed_async(*args: Any, **kwargs: Any) -> Any:
            into.append((tag + ">", clock()))
            try:
                return await inner(*args, **kwargs)
            finally:
                into.append((tag + "<", clock()))

        setattr(owner, name, timed_async)
        return

    def timed(*args: Any, **kwargs: Any) -> Any:
        into.append((tag + ">", clock()))
        try:
            return inner(*args, **kwargs)
        finally:
            into.append((tag + "<", clock()))

    setattr(owner, name, timed)


def _is_async(function: Callable[..., Any]) -> bool:
    import inspect

    return inspect.iscoroutinefunction(function)


def serve_child(args: argparse.Namespace) -> int:
    import torch

    import server.stream as stream
    from lambda_split import load_llm_service
    from lambda_split._service import TrunkService
    from server import BackgroundServer, ServerConfig

    torch.set_num_threads(1)
    stamps: Stamps = []
    service, info = load_llm_service(MODEL, SPLIT, security=args.security)
    executor: Any = service.executor
    _stamp(executor.scheduler, "_run_batch", "s:forward", stamps)
    _stamp(TrunkService, "step", "s:step", stamps)
    _stamp(stream.TrunkStreamEndpoint, "_handle", "s:handle", stamps)
    _stamp(stream.TrunkStreamEndpoint, "_next", "s:next", stamps)
    config = ServerConfig(model=MODEL, split=SPLIT, security=args.security, keys=args.keys, port=0)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    with BackgroundServer(config, (service, info)) as running:
        print(f"listening on {running.url}", flush=True)
        stop.wait()
    Path(args.stamps).write_text("".join(f"{tag} {at!r}\n" for tag, at in stamps))
    return 0


def _segments(device: Stamps, server: Stamps, since: float) -> dict[str, list[float]]:
    """Milliseconds of each segment (``a -> b``: consecutive stamps) per decode step after the first
    two; and per step its ``forward``, ``head`` and ``tail`` (from their own stamps), the whole
    ``step`` and the ``overhead`` (the step less those three)."""
    merged = sorted([(at, tag) for tag, at in device] + [(at, tag) for tag, at in server if at >= since])
    starts = [i for i, (_, tag) in enumerate(merged) if tag == "c:trunk>"]
    out: dict[str, list[float]] = defaultdict(list)
    for first, last in itertools.pairwise(starts[2:]):
        step = merged[first : last + 1]
        for (at, tag), (next_at, next_tag) in itertools.pairwise(step):
            out[f"{tag} -> {next_tag}"].append(1000 * (next_at - at))
        when = {tag: at for at, tag in step}
        parts = {name: when.get(f"{tag}<", 0.0) - when.get(f"{tag}>", 0.0)
                 for name, tag in (("forward", "s:forward"), ("head", "c:head"), ("tail", "c:tail"))}  # fmt: skip
        total = merged[last][0] - merged[first][0]
        for name, seconds in (*parts.items(), ("step", total), ("overhead", total - sum(parts.values()))):
            out[name].append(1000 * seconds)
    return out


def measure(args: argparse.Namespace) -> dict[str, list[float]]:
    import torch

    from lambda_split._client import RemoteTrunk
    from lambda_split._parts import Head, Tail
    from lambda_split.cli.bench._clients import ClientModel, Connections, Target
    from secure_channel import generate_credentials
    from secure_channel._ws import WebSocketStream

    torch.set_num_threads(1)
    stamps: Stamps = []
    _stamp(RemoteTrunk, "__call__", "c:trunk", stamps)
    _stamp(Head, "forward", "c:head", stamps)
    _stamp(Tail, "forward", "c:tail", stamps)
    _stamp(WebSocketStream, "send", "c:send", stamps)
    _stamp(WebSocketStream, "recv", "c:recv", stamps)
    segments: dict[str, list[float]] = defaultdict(list)
    client = ClientModel(MODEL, SPLIT)
    for run in range(args.runs):
        with tempfile.TemporaryDirectory() as work:
            keys, server_stamps = f"{work}/keys", f"{work}/stamps"
            generate_credentials(keys, days=1)
            command = [sys.executable, __file__, "--serve-child", "--security", args.security, "--keys", keys,
                       "--stamps", server_stamps]  # fmt: skip
            child = subprocess.Popen(command, stdout=subprocess.PIPE, text=True, start_new_session=True)
            try:
                line = child.stdout.readline() if child.stdout else ""
                if not line.startswith("listening on "):
                    raise SystemExit(f"the server did not start: {line!r}")
                keys_dir = keys if args.security != "plain" else None
                conns = Connections(Target(line.split()[-1], args.security, keys_dir))
                transport, link = conns.get("stream")
                client.run(link, transport, "fp16", 4)  # warm-up: first calls, the stream, its session
                stamps.clear()
                since = time.perf_counter()
                client.run(link, transport, "fp16", args.tokens)
                conns.close()
            finally:
                child.send_signal(signal.SIGTERM)
                child.wait(60)
            server = [
                (t, float(at)) for t, at in (x.split() for x in Path(server_stamps).read_text().splitlines())
            ]
        for name, values in _segments(stamps, server, since).items():
            segments[name].extend(values)
        print(f"run {run + 1}/{args.runs} done", file=sys.stderr)
    return segments


def floor(server_wait_s: float = 0.04, device_wait_s: float = 0.016, steps: int = 60) -> None:
    """Print the bare round trip beyond the waits, with and without a thread hop on the server."""
    for hop in (False, True):
        listener = socket.create_server(("127.0.0.1", 0))
        pid = os.fork()
        if pid == 0:
            _echo(listener, hop, server_wait_s)
        address = listener.getsockname()
        listener.close()
        device = socket.create_connection(address)
        device.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        message, beyond = b"x" * 1200, []
        for _ in range(steps):
            started = time.perf_counter()
            device.sendall(message)
            received = 0
            while received < len(message):
                received += len(device.recv(65536))
            beyond.append(1000 * (time.perf_counter() - started - server_wait_s))
            time.sleep(device_wait_s)
        device.close()
        os.waitpid(pid, 0)
        what = "a thread hop on the server" if hop else "no thread hop"
        print(f"loopback TCP, {what}: {statistics.median(beyond[5:]):.3f} ms beyond the 40 ms wait (median)")


def _echo(listener: socket.socket, hop: bool, wait_s: float) -> None:
    """The floor's server (a forked process): echo each message after ``wait_s``, waited on a worker
    thread with ``hop``; exit when the device closes."""
    conn, _ = listener.accept()
    conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    jobs: queue.SimpleQueue[bytes] = queue.SimpleQueue()
    done: queue.SimpleQueue[bytes] = queue.SimpleQueue()

    def worker() -> None:
        while True:
            message = jobs.get()
            time.sleep(wait_s)
            done.put(message)

    threading.Thread(target=worker, daemon=True).start()
    while data := conn.recv(65536):
        if hop:
            jobs.put(data)
            data = done.get()
        else:
            time.sleep(wait_s)
        conn.sendall(data)
    os._exit(0)


_TOTALS = ("forward", "head", "tail", "step", "overhead")


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--security", default="tls+aesgcm", choices=("plain", "tls", "aesgcm", "tls+aesgcm"))
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--runs", type=int, default=2)
    parser.add_argument("--floor", action="store_true", help="the bare TCP round trip under the stack")
    parser.add_argument("--serve-child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--keys", help=argparse.SUPPRESS)
    parser.add_argument("--stamps", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve_child:
        return serve_child(args)
    if args.floor:
        floor()
        return 0
    segments = measure(args)
    steps = len(segments["step"])
    print(
        f"{MODEL} {SPLIT}, {args.security}, fp16 wire, {args.runs} runs of {args.tokens} tokens ({steps} steps)"
    )
    print("  median ms  steps  segment (c: device, s: server; > begins, < ends)")
    for name, values in segments.items():
        if name not in _TOTALS and len(values) >= steps / 2:  # the usual order of events
            print(f"  {statistics.median(values):9.3f}  {len(values):5d}  {name}")
    for name in _TOTALS:
        print(f"  {statistics.median(segments[name]):9.3f}  {steps:5d}  {name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
