"""Failover: a trunk server lost mid-generation costs one replay, and no token changes.

Faults are injected at a chosen step, never by timing: every transport the client opens is
wrapped in a :class:`Tripwire` that runs a callback just before the Nth step request leaves.
Servers run in this process (fast) or, to be killed with SIGKILL, as ``lambda-split serve``
subprocesses (marked heavy); each test stops everything it starts.
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from lambda_split import (
    Checkpoint,
    FailoverEvent,
    FailoverPolicy,
    FingerprintMismatch,
    GenerationConfig,
    GenerationResult,
    ServerError,
    SplitClient,
    TrunkService,
    TrunkUnavailable,
    encode_prompts,
    failover_worthy,
    load_llm_service,
)
from lambda_split.cli import main
from lambda_split.protocol import StreamOp
from secure_channel import (
    AuthenticationError,
    ChannelTimeout,
    Request,
    Response,
    SessionLost,
    Stream,
    StreamClosed,
    StreamUnsupported,
    Transport,
    TransportError,
    WireStats,
    connect_transport,
)
from server import BackgroundServer, ServerConfig
from tests.secure_channel.conftest import PKI
from tests.server.conftest import LiveServer, start_server

PROMPT = "The quick brown fox"
GREEDY = GenerationConfig(max_new_tokens=12)
FAST = FailoverPolicy(attempts=3, deadline_s=20.0, backoff_s=0.01, max_backoff_s=0.05)


# --- fault injection -----------------------------------------------------------------------------


@dataclass
class Faults:
    """Counts step requests over every transport of one client; runs ``hooks[n]`` before step n."""

    hooks: dict[int, Callable[[], Response | None]] = field(default_factory=dict)
    steps: int = 0
    connects: list[str] = field(default_factory=list)
    requests: dict[str, int] = field(default_factory=dict)  # per URL: requests other than GET /v1/info

    def before_step(self) -> Response | None:
        self.steps += 1
        hook = self.hooks.get(self.steps)
        return hook() if hook is not None else None


class _TripStream(Stream):
    def __init__(self, inner: Stream, faults: Faults) -> None:
        self.inner, self.faults, self.stats = inner, faults, inner.stats

    def send(self, message: bytes) -> None:
        if message[:1] in (bytes((StreamOp.STEP,)), bytes((StreamOp.BOUND_STEP,))):
            self.faults.before_step()
        self.inner.send(message)

    def recv(self) -> bytes:
        return self.inner.recv()

    def close(self) -> None:
        self.inner.close()


class Tripwire(Transport):
    """Passes everything to ``inner``, counting steps; a hook may answer a step itself."""

    def __init__(self, inner: Transport, url: str, faults: Faults) -> None:
        self.inner, self.url, self.faults = inner, url, faults
        self.security, self.stats = inner.security, inner.stats

    def exchange(self, request: Request) -> Response:
        if request.path != "/v1/info":
            self.faults.requests[self.url] = self.faults.requests.get(self.url, 0) + 1
        if request.path.endswith("/step"):
            fake = self.faults.before_step()
            if fake is not None:
                return fake
        return self.inner.exchange(request)

    def open_stream(self, path: str, headers: Mapping[str, str] | None = None) -> Stream:
        self.faults.requests[self.url] = self.faults.requests.get(self.url, 0) + 1
        return _TripStream(self.inner.open_stream(path, headers), self.faults)

    def close(self) -> None:
        self.inner.close()


def stopping(*servers: LiveServer) -> Callable[[], None]:
    """A hook that stops ``servers`` (in this process: the next request finds the port closed)."""

    def stop() -> None:
        for server in servers:
            server.stop()

    return stop


def factory(faults: Faults, security: str = "plain", keys: Path | None = None) -> Callable[[str], Transport]:
    def connect(url: str) -> Transport:
        faults.connects.append(url)
        return Tripwire(connect_transport(url, security, keys_dir=keys, timeout=30), url, faults)

    return connect


def client_for(
    urls: list[str],
    tiny: Checkpoint,
    faults: Faults,
    *,
    policy: FailoverPolicy | None = FAST,
    events: list[FailoverEvent] | None = None,
    transport_kind: str = "http",
    security: str = "plain",
    keys: Path | None = None,
) -> SplitClient:
    return SplitClient.connect(
        urls,
        security=security,  # type: ignore[arg-type]
        keys=keys,
        model=tiny,
        failover=policy,
        on_failover=None if events is None else events.append,
        transport_factory=factory(faults, security, keys),
        transport_kind=transport_kind,  # type: ignore[arg-type]
    )


def tokens(client: SplitClient) -> GenerationResult:
    ids, mask = encode_prompts(client.tokenizer, [PROMPT], chat=True)
    return client.generate_ids(ids, mask, GREEDY, keep_logits=True)


def same_answer(result: GenerationResult, reference: GenerationResult) -> bool:
    """The same tokens, and logits equal up to float rounding: the replay was one prefill where the
    lost trunk ran step by step (without the replay they differ by 0.3 and more, yet the tiny
    random model often picks the same tokens, so the tokens alone would not show a lost context)."""
    return result.token_ids == reference.token_ids and all(
        float((ours - theirs).abs().max()) < 1e-4
        for ours, theirs in zip(result.logits, reference.logits, strict=True)
    )


def error_reply(status: int, code: str) -> Callable[[], Response]:
    body = json.dumps({"error": {"code": code, "message": "injected"}}).encode()
    return lambda: Response(status, body, {"content-type": "application/json"})


# --- in-process servers --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> PKI:
    return PKI.create(tmp_path_factory.mktemp("failover-pki"))


@pytest.fixture(scope="module")
def loaded(tiny: Checkpoint) -> dict[tuple[str, str], tuple[TrunkService, dict[str, Any]]]:
    """Trunk services by (mode, split), shared by the replicas of this module: loading is the slow part."""
    return {}


@pytest.fixture
def servers(
    tiny: Checkpoint, pki: PKI, loaded: dict[tuple[str, str], tuple[TrunkService, dict[str, Any]]]
) -> Iterator[Callable[..., LiveServer]]:
    """Starts servers on free loopback ports. Servers of one mode and split share one loaded trunk
    (and its sessions), like replicas behind one address; ``limits`` or ``fresh`` get their own."""
    started: list[LiveServer] = []

    def start(mode: str = "plain", split: str = "2:-2", *, fresh: bool = False, **limits: Any) -> LiveServer:
        if fresh or limits:
            started.append(start_server(tiny, mode, pki.root, split, **limits))
            return started[-1]
        if (mode, split) not in loaded:
            loaded[mode, split] = load_llm_service(tiny, split, security=mode)
        config = ServerConfig(model=tiny.name, split=split, security=mode, keys=str(pki.root), port=0)
        running = BackgroundServer(config, loaded[mode, split])
        started.append(LiveServer(mode, running.url, pki.root, loaded[mode, split][0], running))
        return started[-1]

    yield start
    for server in started:
        server.stop()


def undisturbed(tiny: Checkpoint, keys: Path) -> GenerationResult:
    """The tokens and logits of a run on a plain server of its own, with no failover."""
    server = start_server(tiny, "plain", keys)
    try:
        with SplitClient.connect(server.url, security="plain", model=tiny, failover=None) as client:
            return tokens(client)
    finally:
        server.stop()


@pytest.fixture(scope="module")
def reference(tiny: Checkpoint, pki: PKI) -> GenerationResult:
    """The tokens of an undisturbed run."""
    return undisturbed(tiny, pki.root)


@pytest.mark.parametrize("transport_kind", ["http", "stream"])
def test_a_server_stopped_mid_generation_fails_over_with_the_same_tokens(
    servers: Callable[..., LiveServer], tiny: Checkpoint, reference: GenerationResult, transport_kind: str
) -> None:
    first, second = servers(), servers()
    faults, events = Faults(), list[FailoverEvent]()
    faults.hooks[5] = stopping(first)
    with client_for(
        [first.url, second.url], tiny, faults, events=events, transport_kind=transport_kind
    ) as client:
        assert same_answer(tokens(client), reference)
        assert client.failovers == 1 and client.url == second.url
        # The bytes sent to the first server still count.
        assert client.wire_stats.bytes_sent > client.transport.stats.bytes_sent > 0
    assert [event.stage for event in events] == ["lost", "recovered"]
    # The replay is the prompt and the 3 tokens decoded before the lost step (4 steps answered).
    assert events[1].url == second.url and events[1].replayed_tokens == faults_prompt_tokens(tiny) + 3


def faults_prompt_tokens(tiny: Checkpoint) -> int:
    return int(encode_prompts(tiny.tokenizer, [PROMPT], chat=True)[0].shape[1])


def test_a_session_the_server_forgot_is_replayed_on_the_same_url(
    servers: Callable[..., LiveServer], tiny: Checkpoint, reference: GenerationResult
) -> None:
    """After a restart behind a proxy, or an idle expiry, the server answers 404: replay there."""
    server = servers(fresh=True, idle_timeout_s=60)
    now = [0.0]
    server.service._clock = lambda: now[0]

    def forget() -> None:
        now[0] += 61
        assert server.service.expire_idle() == 1

    faults = Faults(hooks={4: forget})
    with client_for([server.url], tiny, faults) as client:
        assert same_answer(tokens(client), reference)
        assert client.failovers == 1
    assert faults.connects == [server.url, server.url]


def test_the_replay_is_cut_to_the_new_servers_step_limit(
    servers: Callable[..., LiveServer], tiny: Checkpoint, reference: GenerationResult
) -> None:
    first, second = servers(), servers(max_step_tokens=3)
    faults = Faults(hooks={6: stopping(first)})
    with client_for([first.url, second.url], tiny, faults) as client:
        assert same_answer(tokens(client), reference)
    history = faults_prompt_tokens(tiny) + 4
    # 5 steps before the kill, the killed step, the replay in chunks of 3, the re-run, the rest.
    assert faults.steps == 6 + -(-history // 3) + 1 + (reference.new_tokens - 6)


def test_aesgcm_failover_handshakes_again(
    servers: Callable[..., LiveServer], tiny: Checkpoint, reference: GenerationResult, pki: PKI
) -> None:
    first, second = servers("aesgcm"), servers("aesgcm")
    faults = Faults(hooks={3: stopping(first)})
    with client_for([first.url, second.url], tiny, faults, security="aesgcm", keys=pki.root) as client:
        assert same_answer(tokens(client), reference)
        assert client.failovers == 1 and client.transport.security == "aesgcm"


def test_when_every_server_is_down_the_client_gives_up_after_its_attempts(
    servers: Callable[..., LiveServer], tiny: Checkpoint
) -> None:
    first, second = servers(), servers()
    faults, events = Faults(), list[FailoverEvent]()
    faults.hooks[3] = stopping(first, second)
    with (
        client_for([first.url, second.url], tiny, faults, events=events) as client,
        pytest.raises(TrunkUnavailable, match="after 6 attempt") as caught,
    ):
        tokens(client)
    assert caught.value.attempts == 6  # 3 passes over 2 servers
    assert len(faults.connects) == 1 + 6
    assert [event.stage for event in events] == ["lost", "failed"]
    assert isinstance(caught.value, TransportError)  # callers that caught the symptom still do


def test_the_deadline_ends_the_attempts(servers: Callable[..., LiveServer], tiny: Checkpoint) -> None:
    server = servers()
    faults = Faults(hooks={2: stopping(server)})
    patient = FailoverPolicy(attempts=10_000, deadline_s=0.5, backoff_s=0.01, max_backoff_s=0.02)
    with (
        client_for([server.url], tiny, faults, policy=patient) as client,
        pytest.raises(TrunkUnavailable) as caught,
    ):
        tokens(client)
    assert 1 <= caught.value.attempts < 10_000


@pytest.mark.parametrize(
    ("status", "code"), [(400, "bad_frame"), (413, "too_large"), (403, "forbidden"), (500, "internal")]
)
def test_a_refused_step_is_not_retried(
    servers: Callable[..., LiveServer], tiny: Checkpoint, status: int, code: str
) -> None:
    server = servers()
    faults, events = Faults(hooks={3: error_reply(status, code)}), list[FailoverEvent]()
    with (
        client_for([server.url, server.url + "/"], tiny, faults, events=events) as client,
        pytest.raises(ServerError) as caught,
    ):
        tokens(client)
    assert caught.value.status == status
    assert faults.connects == [server.url] and events == []


@pytest.mark.parametrize(
    ("status", "code"), [(502, "bad_gateway"), (503, "draining"), (503, "step_timeout"), (504, "timeout")]
)
def test_a_proxy_or_draining_reply_fails_over(
    servers: Callable[..., LiveServer], tiny: Checkpoint, reference: GenerationResult, status: int, code: str
) -> None:
    server = servers(fresh=True)
    faults = Faults(hooks={3: error_reply(status, code)})
    with client_for([server.url], tiny, faults) as client:
        assert same_answer(tokens(client), reference)
        assert client.failovers == 1
    # The server answered, so the session left behind was closed, not left to hold memory until
    # its idle expiry (or count against the session limits of the replay that follows).
    assert server.service.open_sessions == 0


def test_an_authentication_failure_on_reconnect_is_not_retried(
    servers: Callable[..., LiveServer], tiny: Checkpoint
) -> None:
    first, second = servers(), servers()
    faults = Faults(hooks={3: stopping(first)})
    connect = factory(faults)

    def refusing(url: str) -> Transport:
        if url == second.url:
            faults.connects.append(url)
            raise AuthenticationError("the server's certificate is not ours")
        return connect(url)

    client = SplitClient.connect(
        [first.url, second.url], security="plain", model=tiny, failover=FAST, transport_factory=refusing
    )
    with client, pytest.raises(AuthenticationError):
        tokens(client)
    assert faults.connects == [first.url, second.url]


class _Health(Transport):
    def __init__(self, status: int) -> None:
        self.status, self.stats, self.security = status, WireStats(), "plain"

    def exchange(self, request: Request) -> Response:
        assert (request.method, request.path) == ("GET", "/healthz")
        return Response(self.status, b"{}")


class RefusedHandshake(Transport):
    """What AESGCMTransport raises when the handshake gets any error reply, a draining 503 included."""

    def __init__(self, health: int) -> None:
        self.inner, self.stats, self.security = _Health(health), WireStats(), "plain"

    def exchange(self, request: Request) -> Response:
        raise AuthenticationError("server refused the handshake (draining)")


@pytest.mark.parametrize(("health", "recovers"), [(503, True), (502, True), (200, False)])
def test_a_refused_handshake_fails_over_only_if_the_server_is_unavailable(
    servers: Callable[..., LiveServer],
    tiny: Checkpoint,
    reference: GenerationResult,
    health: int,
    recovers: bool,
) -> None:
    first, second = servers(), servers()
    faults = Faults(hooks={3: stopping(first)})
    connect = factory(faults)

    def draining_once(url: str) -> Transport:
        if url == second.url and faults.connects.count(url) == 0:
            faults.connects.append(url)
            return RefusedHandshake(health)
        return connect(url)

    client = SplitClient.connect(
        [first.url, second.url], security="plain", model=tiny, failover=FAST, transport_factory=draining_once
    )
    with client:
        if recovers:
            assert same_answer(tokens(client), reference) and client.failovers == 1
            assert faults.connects == [first.url, second.url, first.url, second.url]
        else:
            with pytest.raises(AuthenticationError):
                tokens(client)
            assert faults.connects == [first.url, second.url]


def test_a_replacement_with_another_trunk_is_refused_and_sees_nothing(
    servers: Callable[..., LiveServer], tiny: Checkpoint
) -> None:
    first, other = servers(), servers(split="3:-2", fresh=True)
    faults = Faults(hooks={3: stopping(first)})
    with (
        client_for([first.url, other.url], tiny, faults) as client,
        pytest.raises(FingerprintMismatch, match="refusing to replay"),
    ):
        tokens(client)
    assert faults.connects == [first.url, other.url]
    assert other.url not in faults.requests  # only GET /v1/info reached it: no session, no history
    assert other.service.open_sessions == 0


def test_without_failover_a_lost_server_is_the_callers_error(
    servers: Callable[..., LiveServer], tiny: Checkpoint
) -> None:
    first, second = servers(), servers()
    faults = Faults(hooks={3: stopping(first)})
    with (
        client_for([first.url, second.url], tiny, faults, policy=None) as client,
        pytest.raises(TransportError) as caught,
    ):
        tokens(client)
    assert not isinstance(caught.value, TrunkUnavailable) and faults.connects == [first.url]


def test_the_first_server_that_answers_is_used(servers: Callable[..., LiveServer], tiny: Checkpoint) -> None:
    dead = servers()
    dead.stop()
    live = servers()
    faults = Faults()
    with client_for([dead.url, live.url], tiny, faults) as client:
        assert client.url == live.url
        assert faults.connects == [dead.url, live.url]


# --- the command line ----------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def test_generate_exits_4_with_one_line_when_no_server_answers(capsys: pytest.CaptureFixture[str]) -> None:
    dead = [f"http://127.0.0.1:{free_port()}", f"http://127.0.0.1:{free_port()}"]
    argv = ["generate", "--server", dead[0], "--server", dead[1], "--security", "plain"]
    assert main([*argv, "--model", "tiny-random-llama", "hello"]) == 4
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("lambda-split: error: none of the 2 trunk servers answered")
    assert not any("Traceback" in line for line in err)


def test_generate_json_counts_failovers(
    servers: Callable[..., LiveServer],
    tiny: Checkpoint,
    reference: GenerationResult,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    first, second = servers(), servers()
    faults = Faults(hooks={4: stopping(first)})
    connect = SplitClient.connect
    monkeypatch.setattr(
        SplitClient,
        "connect",
        lambda *args, **kwargs: connect(*args, transport_factory=factory(faults), **kwargs),
    )
    argv = ["generate", "--server", first.url, "--server", second.url, "--security", "plain"]
    argv += ["--model", "tiny-random-llama", "--max-new-tokens", "12", "--json", PROMPT]
    assert main(argv) == 0
    out, err = capsys.readouterr()
    data = json.loads(out)
    assert data["token_ids"] == reference.token_ids[0]
    assert data["stats"]["failovers"] == 1 and data["stats"]["failover_s"] > 0
    assert f"failed over to {second.url}" in err and PROMPT not in err


@pytest.mark.parametrize(
    ("given", "expected"), [([], FailoverPolicy(deadline_s=30)), (["--failover-attempts", "0"], None)]
)
def test_generate_passes_the_failover_policy(
    monkeypatch: pytest.MonkeyPatch, given: list[str], expected: FailoverPolicy | None
) -> None:
    seen: list[Any] = []

    def connect(*args: Any, **kwargs: Any) -> Any:
        seen.append((args, kwargs["failover"]))
        raise TrunkUnavailable("stop here")

    monkeypatch.setattr(SplitClient, "connect", connect)
    argv = [
        "generate",
        "--server",
        "http://127.0.0.1:9",
        "--security",
        "plain",
        "--model",
        "tiny-random-llama",
    ]
    assert main([*argv, *given, "hello"]) == 4
    assert seen == [((["http://127.0.0.1:9"],), expected)]


def test_generate_refuses_the_same_server_twice(capsys: pytest.CaptureFixture[str]) -> None:
    url = "http://127.0.0.1:9"
    argv = [
        "generate",
        "--server",
        url,
        "--server",
        url,
        "--security",
        "plain",
        "--model",
        "tiny-random-llama",
    ]
    with pytest.raises(SystemExit) as exited:
        main([*argv, "hello"])
    assert exited.value.code == 2 and "the same URL is given twice" in capsys.readouterr().err


# --- kill -9: lambda-split serve in subprocesses ---------------------------------------------------


class Replica:
    """``lambda-split serve`` of tiny-random-llama in plain mode, in a subprocess on ``port`` (0: free).
    Starts on construction; :meth:`wait` returns once it listens."""

    def __init__(self, port: int = 0) -> None:
        command = [sys.executable, "-m", "lambda_split", "serve", "--model", "tiny-random-llama"]
        command += ["--split", "2:-2", "--security", "plain", "--port", str(port)]
        self.process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        self.url = ""

    def wait(self) -> Replica:
        guard = threading.Timer(180, self.process.kill)  # a server that never says it listens
        guard.start()
        try:
            assert self.process.stdout is not None
            line = self.process.stdout.readline()
        finally:
            guard.cancel()
        if not line.startswith("listening on "):
            self.stop()
            raise AssertionError(f"lambda-split serve did not start: {line!r}")
        self.url = line.removeprefix("listening on ").strip()
        return self

    @property
    def port(self) -> int:
        return int(self.url.rsplit(":", 1)[1])

    @property
    def alive(self) -> bool:
        return self.process.poll() is None

    def kill(self) -> None:
        """SIGKILL: no graceful anything; the sockets die with the process."""
        self.process.kill()
        self.process.wait(30)

    def stop(self) -> None:
        if self.alive:
            self.kill()
        if self.process.stdout is not None:
            self.process.stdout.close()


@pytest.fixture(scope="module")
def replicas() -> Iterator[list[Replica]]:
    """Two replicas; a test that kills one leaves it for :func:`alive` to start again."""
    started: list[Replica] = []
    try:
        started.extend(Replica() for _ in range(2))  # both start at once, then both are awaited
        for replica in started:
            replica.wait()
        yield started
    finally:
        for replica in started:
            replica.stop()


@pytest.fixture
def alive(replicas: list[Replica]) -> list[Replica]:
    """The replicas, the dead ones started again; oldest first, so each kill test kills another one."""
    for index, replica in enumerate(replicas):
        if not replica.alive:
            replica.stop()
            replicas[index] = Replica()
            replicas[index].wait()
    return sorted(replicas, key=lambda replica: replica.process.pid)


@pytest.mark.heavy
@pytest.mark.parametrize(
    "transport_kind",
    # the HTTP path's failover: test_a_server_stopped_mid_generation_fails_over_with_the_same_tokens[http]
    [pytest.param("http", marks=pytest.mark.exhaustive), "stream"],
)
def test_kill_9_mid_generation_costs_one_replay_and_no_token(
    alive: list[Replica], tiny: Checkpoint, reference: GenerationResult, transport_kind: str
) -> None:
    first, second = alive
    faults, events = Faults(hooks={5: first.kill}), list[FailoverEvent]()
    urls = [first.url, second.url]
    with client_for(urls, tiny, faults, events=events, transport_kind=transport_kind) as client:
        assert same_answer(tokens(client), reference)
        assert client.failovers == 1 and client.url == second.url
    assert [event.stage for event in events] == ["lost", "recovered"]


@pytest.mark.heavy
def test_a_server_restarted_on_its_url_takes_the_session_back(
    replicas: list[Replica], tiny: Checkpoint, reference: GenerationResult
) -> None:
    """One URL (as behind a proxy): kill -9, a new process on the same port, the history replayed there."""
    index = next(index for index, replica in enumerate(replicas) if replica.alive)
    url = replicas[index].url

    def restart() -> None:
        replicas[index].stop()
        replicas[index] = Replica(replicas[index].port).wait()

    faults = Faults(hooks={5: restart})
    with client_for([url], tiny, faults) as client:
        assert same_answer(tokens(client), reference)
        assert client.failovers == 1
    assert faults.connects == [url, url]


# --- what counts as a lost server ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("error", "worthy"),
    [
        (TransportError("connection refused"), True),
        (ChannelTimeout("read timed out"), True),
        (SessionLost("unknown_session"), True),
        (StreamClosed(1001, "going away"), True),
        (StreamClosed(1013, "try again later"), True),
        (StreamClosed(1008, "policy"), False),
        (StreamClosed(1009, "too big"), False),
        (StreamUnsupported("no streams"), False),
        (ServerError(404, "session_not_found", "gone"), True),
        (ServerError(410, "gone", "gone"), True),
        (ServerError(502, "bad_gateway", ""), True),
        (ServerError(503, "draining", ""), True),
        (ServerError(504, "gateway_timeout", ""), True),
        (ServerError(400, "bad_frame", ""), False),
        (ServerError(413, "too_large", ""), False),
        (ServerError(429, "rate_limited", ""), False),
        (ServerError(500, "internal", ""), False),
        (AuthenticationError("bad certificate"), False),
        (FingerprintMismatch("other model"), False),
        (TrunkUnavailable("nobody"), False),
        (ValueError("bug"), False),
    ],
)
def test_which_errors_mean_a_lost_server(error: BaseException, worthy: bool) -> None:
    assert failover_worthy(error) is worthy


def test_the_policy_validates_and_backs_off() -> None:
    for bad in ({"attempts": 0}, {"deadline_s": 0}, {"backoff_s": 2, "max_backoff_s": 1}, {"jitter": 2}):
        with pytest.raises(ValueError):
            FailoverPolicy(**bad)
    steady = FailoverPolicy(backoff_s=0.5, max_backoff_s=3, jitter=0)
    assert [steady.wait_before(n) for n in range(1, 7)] == [0, 0.5, 1, 2, 3, 3]
    jittery = FailoverPolicy(backoff_s=1, max_backoff_s=1, jitter=0.5)
    assert all(0.5 <= jittery.wait_before(3) <= 1 for _ in range(50))
