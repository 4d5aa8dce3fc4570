"""The failover section of the deployment benchmark: a trunk replica killed mid-generation.

Per security mode, two ``lambda-split serve`` replicas run in child processes. This process is the
device: the library's failover client (a :class:`SplitClient` given the replicas' URLs, as
``generate --server A --server B``) generates greedily on the fp32 wire, and right after token
``kill_after`` is chosen the replica serving it gets SIGKILL. The next step fails over: a new
connection and handshakes, a new session, the history (prompt and tokens so far) replayed as one
prefill, then the failed step again. Scenarios, by the number of replicas the client knows:

- ``2``: the client has both URLs and moves to the other replica (restarted after the run);
- ``1``: the client has one URL; the killed replica is started again at once on the same port and
  the client retries, with the library's backoff, until it answers (bounded by the deadline).

One run's timeline, on one clock: token K chosen, kill sent, loss detected (the ``lost`` event),
the successful attempt starts, new transport verified and session open, replay done, failed step
answered, token K+1 chosen. The tokens are compared with an undisturbed run of the same prompt.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

import torch

from lambda_split._client import RemoteTrunk, SplitClient, fetch_info
from lambda_split._failover import FailoverEvent, FailoverPolicy, Reconnector, ResilientTrunk
from lambda_split._generate import GenerationConfig, generate_tokens
from lambda_split.cli.bench._clients import ClientModel
from lambda_split.cli.bench._procs import ServerProcess
from lambda_split.cli.bench._stats import rotated, summarize
from secure_channel import Transport, WireStats, check_security_mode, connect_transport

ProgressFn = Callable[[str], None]
AFTER_KILL = 4  # tokens generated after the failover, all compared with the undisturbed run
PHASES = (
    "exit_s",
    "detection_s",
    "wait_s",
    "reconnect_s",
    "replay_s",
    "step_s",
    "stall_s",
    "kill_to_token_s",
)


@dataclass
class _Call:
    start: float
    end: float
    positions: int
    sent: int
    received: int


@dataclass
class _Timeline:
    tokens: list[float] = field(default_factory=list)  # when each token was chosen
    calls: list[_Call] = field(default_factory=list)  # answered trunk steps
    switches: list[tuple[float, float, bool]] = field(default_factory=list)  # (start, end, succeeded)
    opens: list[tuple[float, float]] = field(default_factory=list)  # session opened (start, end)
    events: list[tuple[float, FailoverEvent]] = field(default_factory=list)
    kill: tuple[float, float] = (0.0, 0.0)  # SIGKILL sent, process reaped
    restart: ServerProcess | None = None


class _TimedTrunk:
    """A trunk session that records each answered step: when, how many positions, socket bytes."""

    def __init__(self, trunk: RemoteTrunk, stats: WireStats, timeline: _Timeline) -> None:
        self.trunk, self.stats, self.timeline = trunk, stats, timeline

    def __call__(self, hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        sent, received, start = self.stats.bytes_sent, self.stats.bytes_received, time.perf_counter()
        out = self.trunk(hidden, mask)
        self.timeline.calls.append(_Call(start, time.perf_counter(), int(mask.shape[1]),
                                         self.stats.bytes_sent - sent, self.stats.bytes_received - received))  # fmt: skip
        return out

    def close(self) -> None:
        self.trunk.close()


class _TimedHost:
    """The client as :class:`ResilientTrunk` sees it, with each switch and session opening timed."""

    def __init__(self, client: SplitClient, timeline: _Timeline) -> None:
        self.client, self.timeline, self.url = client, timeline, client.url

    def open_trunk(self) -> _TimedTrunk:
        start = time.perf_counter()
        trunk = self.client.open_trunk()
        self.timeline.opens.append((start, time.perf_counter()))
        return _TimedTrunk(trunk, self.client.transport.stats, self.timeline)

    def switch_to(self, url: str) -> None:
        start, ok = time.perf_counter(), False
        try:
            self.client.switch_to(url)
            ok = True
        finally:
            self.timeline.switches.append((start, time.perf_counter(), ok))
            self.url = self.client.url

    def replay_chunk(self, request: tuple[int, int, int]) -> int:
        return self.client.replay_chunk(request)


def history_prompt(history: int, kill_after: int) -> torch.Tensor:
    """Seeded byte-range ids (valid in every vocabulary) such that, when the kill comes after token
    ``kill_after``, the trunk holds exactly ``history`` positions: the prompt and every token but the last."""
    length = history - kill_after + 1
    if length < 1:
        raise ValueError(f"a history of {history} positions cannot hold {kill_after} generated tokens")
    return torch.randint(0, 256, (1, length), generator=torch.Generator().manual_seed(history))


class Replicas:
    """The ``lambda-split serve`` replicas of one mode, by URL; a killed one restarts on its port."""

    def __init__(self, start: Callable[[str, int], ServerProcess], count: int, progress: ProgressFn) -> None:
        self._start, self.progress = start, progress
        self.by_url: dict[str, ServerProcess] = {}
        self.pids: list[int] = []
        self.exit_codes: list[int | None] = []
        procs: list[ServerProcess] = []
        try:
            for i in range(count):
                procs.append(self._spawn(f"r{i}", 0))
            for proc in procs:
                self.by_url[proc.ready()] = proc
        except BaseException:  # none is left running
            for proc in procs:
                proc.stop()
            raise
        self.urls = list(self.by_url)

    def _spawn(self, name: str, port: int) -> ServerProcess:
        proc = self._start(name, port)
        self.pids.append(proc.pid)
        return proc

    def kill(self, url: str, *, restart: bool) -> tuple[tuple[float, float], ServerProcess | None]:
        """SIGKILL the replica at ``url`` (when sent, when reaped); with ``restart``, start it again on
        its port at once."""
        proc = self.by_url[url]
        sent = proc.kill()
        self.exit_codes.append(proc.exit_code)
        new = self._spawn(f"r{self.urls.index(url)}", int(urlsplit(url).port or 0)) if restart else None
        if new is not None:
            self.by_url[url] = new
        return sent, new

    def restart_dead(self) -> None:
        """Start every killed replica again on its port, and wait until all answer."""
        for url, proc in list(self.by_url.items()):
            if proc.exit_code is not None:
                self.by_url[url] = self._spawn(f"r{self.urls.index(url)}", int(urlsplit(url).port or 0))
        for url, proc in self.by_url.items():
            if proc.ready() != url:
                raise RuntimeError(f"a restarted replica came back on {proc.url}, not {url}")

    def close(self) -> None:
        self.exit_codes += [proc.stop() for proc in self.by_url.values()]


@dataclass(frozen=True)
class RunSpec:
    """One failover run: the replicas' URLs the client knows, the history at the kill, and the kill."""

    urls: tuple[str, ...]
    history: int
    kill_after: int
    kill: bool  # False: an undisturbed run of the same prompt
    restart: bool = False  # start the killed replica again at once (the one-replica scenario)


def run_once(client_model: ClientModel, replicas: Replicas, spec: RunSpec, *, mode: str, keys: str | None,
             transport_kind: str, policy: FailoverPolicy) -> tuple[list[int], _Timeline, int]:  # fmt: skip
    """One greedy generation through the failover client; returns the tokens, the timeline and the
    bytes of history the client kept."""
    timeline = _Timeline()
    security = check_security_mode(mode)

    def connect(url: str) -> Transport:
        return connect_transport(url, security, keys_dir=keys, timeout=120)

    def on_event(event: FailoverEvent) -> None:
        timeline.events.append((time.perf_counter(), event))

    transport = connect(spec.urls[0])
    reconnector = Reconnector(spec.urls, connect, policy, on_event)
    try:
        client = SplitClient(transport, client_model.parts, fetch_info(transport), wire="fp32",
                             reconnector=reconnector, url=spec.urls[0],
                             transport_kind="http" if transport_kind == "http" else "stream")  # fmt: skip
    except BaseException:
        transport.close()
        raise
    host = _TimedHost(client, timeline)
    ids = history_prompt(spec.history, spec.kill_after)
    new_tokens = spec.kill_after + AFTER_KILL
    trunk = ResilientTrunk(host, reconnector, client.wire, (1, ids.shape[1], new_tokens))

    def on_step() -> None:
        timeline.tokens.append(time.perf_counter())
        if spec.kill and len(timeline.tokens) == spec.kill_after:
            timeline.kill, timeline.restart = replicas.kill(host.url, restart=spec.restart)

    head, tail = client_model.parts.head, client_model.parts.tail
    if head is None or tail is None:  # pragma: no cover - ClientModel loads both
        raise RuntimeError("head and tail not loaded")
    try:
        config = GenerationConfig(max_new_tokens=new_tokens, stop_on_eos=False)
        result = generate_tokens(head, trunk, tail, client_model.tokenizer, ids, torch.ones_like(ids), config,
                                 prefill_chunk=client.check_limits(1, ids.shape[1], new_tokens), on_step=on_step)  # fmt: skip
        kept = trunk.history.nbytes
    finally:
        try:
            trunk.close()
        finally:
            client.close()
    return list(result.token_ids[0]), timeline, kept


def analyse(timeline: _Timeline, kill_after: int) -> dict[str, Any]:
    """The phases of one failover, in seconds, and the replay's socket bytes (see the module doc)."""
    lost = next(t for t, e in timeline.events if e.stage == "lost")
    recovered, event = next((t, e) for t, e in timeline.events if e.stage == "recovered")
    switch = max((s for s in timeline.switches if s[2] and s[0] < recovered), key=lambda s: s[0])
    opened = min((o for o in timeline.opens if o[0] >= switch[1]), key=lambda o: o[0])
    during = [c for c in timeline.calls if c.start > lost and c.end <= recovered]
    replay, step = during[:-1], during[-1]
    before, after = timeline.tokens[kill_after - 1], timeline.tokens[kill_after]
    marks = timeline.tokens
    gaps = [marks[i + 1] - marks[i] for i in range(len(marks) - 1) if i != kill_after - 1]
    out: dict[str, Any] = {
        "exit_s": timeline.kill[1] - timeline.kill[0],
        "detection_s": lost - timeline.kill[0],
        "wait_s": switch[0] - lost,
        "reconnect_s": opened[1] - switch[0],
        "replay_s": (replay[-1].end - replay[0].start) if replay else 0.0,
        "step_s": step.end - step.start,
        "stall_s": after - before,
        "kill_to_token_s": after - timeline.kill[0],
        "undisturbed_step_s": statistics.median(gaps or [0.0]),
        "attempts": event.attempts,
        "replayed_positions": event.replayed_tokens,
        "replay_steps": len(replay),
        "replay_bytes": {"sent": sum(c.sent for c in replay), "received": sum(c.received for c in replay)},
    }
    if timeline.restart is not None and timeline.restart.ready_at is not None:
        out["restart_s"] = timeline.restart.ready_at - timeline.kill[0]
    return out


def collect(plan: Any, client: ClientModel, keys: str, workdir: str, progress: ProgressFn) -> dict[str, Any]:
    """The failover section for ``plan`` (a DeployPlan): per mode, replicas, history length and repetition."""
    policy = FailoverPolicy(attempts=10_000, deadline_s=plan.failover_deadline)
    out: dict[str, Any] = {
        "model": plan.model, "split": [client.spec.start, client.spec.stop], "wire": "fp32",
        "transport": plan.failover_transport, "kill_after_token": plan.failover_kill_after,
        "new_tokens": plan.failover_kill_after + AFTER_KILL, "reps": plan.failover_reps,
        "history": list(plan.failover_history), "replicas": list(plan.failover_replicas),
        "policy": {"attempts": policy.attempts, "deadline_s": policy.deadline_s, "backoff_s": policy.backoff_s,
                   "max_backoff_s": policy.max_backoff_s, "jitter": policy.jitter},
        "by_mode": {}, "processes": {},
    }  # fmt: skip
    for mode in plan.failover_modes:
        out["by_mode"][mode] = _mode(plan, client, mode, keys, workdir, policy, progress, out["processes"])
    out["notes"] = NOTES
    return out


def _mode(plan: Any, client: ClientModel, mode: str, keys: str, workdir: str, policy: FailoverPolicy,
          progress: ProgressFn, processes: dict[str, Any]) -> dict[str, Any]:  # fmt: skip
    def start(name: str, port: int) -> ServerProcess:
        return ServerProcess(plan.model, plan.split, mode, keys, workdir=workdir, threads=plan.threads,
                             name=f"failover-{mode}-{name}", port=port)  # fmt: skip

    count = max(plan.failover_replicas)
    progress(f"failover: starting {count} {mode} replica(s) of lambda-split serve --model {plan.model}")
    replicas = Replicas(start, count, progress)
    credentials = keys if mode != "plain" else None
    runs: dict[tuple[int, int], list[dict[str, Any]]] = {}
    reference: dict[int, list[int]] = {}
    try:
        for history in plan.failover_history:
            spec = RunSpec((replicas.urls[0],), history, plan.failover_kill_after, kill=False)
            reference[history] = run_once(client, replicas, spec, mode=mode, keys=credentials,
                                          transport_kind=plan.failover_transport, policy=policy)[0]  # fmt: skip
        for rep in range(plan.failover_reps):
            for count in map(int, rotated([str(n) for n in plan.failover_replicas], rep)):
                for history in plan.failover_history:
                    urls = tuple(replicas.urls[:count])
                    spec = RunSpec(urls, history, plan.failover_kill_after, kill=True, restart=count == 1)
                    tokens, timeline, kept = run_once(client, replicas, spec, mode=mode, keys=credentials,
                                                      transport_kind=plan.failover_transport, policy=policy)  # fmt: skip
                    entry = analyse(timeline, plan.failover_kill_after)
                    entry["history_bytes"] = kept
                    entry["tokens_equal_undisturbed"] = tokens == reference[history]
                    runs.setdefault((count, history), []).append(entry)
                    progress(f"failover {mode}, {count} replica(s), history {history}, rep {rep + 1}/"
                             f"{plan.failover_reps}: stall {entry['stall_s']:.2f} s (detection "
                             f"{entry['detection_s']:.3f}, wait {entry['wait_s']:.2f}, reconnect "
                             f"{entry['reconnect_s']:.3f}, replay {entry['replay_s']:.3f}); tokens "
                             f"{'equal' if entry['tokens_equal_undisturbed'] else 'DIFFER'}")  # fmt: skip
                    replicas.restart_dead()
    finally:
        replicas.close()
        processes[mode] = {"pids": replicas.pids, "exit_codes": replicas.exit_codes}
    table: dict[str, Any] = {}
    for (count, history), entries in sorted(runs.items(), key=lambda item: (-item[0][0], item[0][1])):
        table.setdefault(str(count), {})[str(history)] = _summary(entries)
    return {"by_replicas": table}


def _summary(entries: list[dict[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {phase: summarize([e[phase] for e in entries], 4) for phase in PHASES}
    out["undisturbed_step_s"] = summarize([e["undisturbed_step_s"] for e in entries], 4)
    if all("restart_s" in e for e in entries):
        out["restart_s"] = summarize([e["restart_s"] for e in entries], 3)
    out["attempts"] = summarize([float(e["attempts"]) for e in entries], 1)
    out["replayed_positions"] = sorted({e["replayed_positions"] for e in entries})
    out["replay_steps"] = max(e["replay_steps"] for e in entries)
    out["replay_bytes"] = {
        k: int(statistics.median(e["replay_bytes"][k] for e in entries)) for k in ("sent", "received")
    }
    out["history_bytes"] = max(e["history_bytes"] for e in entries)
    out["tokens_equal_undisturbed"] = sum(e["tokens_equal_undisturbed"] for e in entries)
    out["runs"] = len(entries)
    return out


NOTES = [
    "the replica serving the client gets SIGKILL right after token kill_after_token is chosen (between two "
    "steps; the kernel closes its sockets, so the loss shows on the next step, not after a timeout)",
    "history = the positions the lost trunk held (prompt + tokens so far but the last) = replayed positions; "
    "the prompt is seeded byte-range ids of the length that gives it",
    "exit: SIGKILL sent -> the process reaped (the kernel tears it down and closes its sockets); "
    "detection: kill sent -> the client's lost event (exit included); wait: lost -> start of the attempt that succeeded "
    "(failed attempts and backoff while no replica answers); reconnect: that attempt's connection, TLS and "
    "AES-GCM handshakes, /v1/info check, stream and session opening; replay: the history's prefill on the "
    "new session; step: the failed step again; stall: token before -> token after; kill_to_token: kill "
    "sent -> token after",
    "2 replicas: the client knows both URLs and moves to the other (the killed one is restarted after the run); "
    "1 replica: the killed replica is started again at once on the same port and the client retries with "
    "the library's backoff (0.25 s doubling to 4 s, jitter 0.5) until it answers; restart_s: kill -> its "
    "listening line",
    "replay_bytes: socket bytes of the replay's steps on the new connection (fp32 wire); history_bytes: the "
    "hidden states and masks the client kept for it",
    f"tokens_equal_undisturbed: runs whose greedy tokens (all of them, {AFTER_KILL} past the failover) equal an "
    "undisturbed run of the same prompt on the fp32 wire",
]
