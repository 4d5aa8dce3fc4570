"""Through a real nginx: the same greedy tokens as direct, session affinity, drain, eavesdropping.

Each security mode is deployed the way deploy/README.md says: ``plain`` behind the HTTP
configuration (header-keyed affinity), ``aesgcm`` behind the TLS-terminating one, ``tls`` and
``tls+aesgcm`` behind the layer-4 passthrough (affinity by client address).
"""

from __future__ import annotations

import json
import signal
import time
from collections.abc import Callable, Iterator

import pytest

from lambda_split import Checkpoint, GenerationConfig, SplitClient
from secure_channel import AuthenticationError, Request, connect_transport
from tests.scaleout.conftest import connect, start_deployment
from tests.scaleout.harness import Deployment, Replica, Tap, wait_exit
from tests.secure_channel.conftest import PKI
from threat_model.capture import capture_loopback
from threat_model.detectors import TextLeakDetector, scan_streams

pytestmark = pytest.mark.heavy
MODES = ("plain", "aesgcm", "tls", "tls+aesgcm")
GREEDY = GenerationConfig(max_new_tokens=12, temperature=0.0)
PROMPT = "the quick brown fox jumps over the lazy dog"


def generate(
    deployment: Deployment, tiny: Checkpoint, kind: str = "http", url: str | None = None
) -> list[int]:
    with SplitClient.from_transport(connect(deployment, url), tiny, transport_kind=kind) as client:  # type: ignore[arg-type]
        return list(client.generate(PROMPT, GREEDY).token_ids[0])


@pytest.fixture(scope="module", params=MODES)
def deployment(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory, device_pki: PKI, proxy_pki: PKI
) -> Iterator[Deployment]:
    mode = str(request.param)
    running = start_deployment(mode, tmp_path_factory.mktemp(mode.replace("+", "-")), device_pki, proxy_pki)
    yield running
    assert running.stop() == [0, 0]  # SIGTERM: drained (nothing open) and exited 0


@pytest.mark.parametrize("kind", ["http", "stream"])
def test_generation_through_the_proxy_gives_the_direct_tokens(
    deployment: Deployment, tiny: Checkpoint, kind: str
) -> None:
    direct = generate(deployment, tiny, "http", url=deployment.replicas[0].url)
    assert generate(deployment, tiny, kind) == direct


def _log_settles(
    deployment: Deployment, before: int, complete: Callable[[list[dict[str, str]]], bool]
) -> list[dict[str, str]]:
    """The access log lines after ``before``, once they are ``complete`` (nginx writes a WebSocket's
    line, and a layer-4 connection's, when the connection closes: a little after the client closed it)."""
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        entries = deployment.nginx.access_log()[before:]
        if complete(entries):
            return entries
        time.sleep(0.05)
    return deployment.nginx.access_log()[before:]


@pytest.mark.parametrize("kind", ["http", "stream"])
def test_every_request_of_a_session_reaches_one_replica(
    deployment: Deployment, tiny: Checkpoint, kind: str
) -> None:
    before = len(deployment.nginx.access_log())
    routes = []
    for _ in range(3):
        transport = connect(deployment)
        routes.append(transport.route)
        with SplitClient.from_transport(transport, tiny, transport_kind=kind) as client:  # type: ignore[arg-type]
            client.generate(PROMPT, GREEDY)
    layer4 = deployment.mode.startswith("tls")

    def complete(entries: list[dict[str, str]]) -> bool:
        if layer4:  # one connection of each client at least, not counting empty ones
            return sum((e.get("sent"), e.get("received")) != ("0", "0") for e in entries) >= 3
        need = 2 if kind == "http" else 1
        streams = sum(e["status"] == "101" for e in entries)  # a WebSocket's line comes when it closes
        return all(sum(e["route"] == r for e in entries) >= need for r in routes) and (
            kind == "http" or streams >= 3
        )

    entries = _log_settles(deployment, before, complete)
    if layer4:  # layer 4: the proxy sees no header, only the address
        # A connection that carried no byte either way (a readiness probe of an earlier fixture, whose
        # line nginx writes when it closes) reached no replica and is no part of a session.
        entries = [e for e in entries if (e["sent"], e["received"]) != ("0", "0")]
        assert entries and all(e["upstream"] not in ("", "-") for e in entries)
        assert len({e["upstream"] for e in entries}) == 1, [e["line"] for e in entries]
        return
    for route in routes:  # the info request, the handshake, every step: one replica
        mine = [e for e in entries if e["route"] == route]
        assert len(mine) >= (2 if kind == "http" else 1), [e["line"] for e in entries]
        assert len({e["upstream"] for e in mine}) == 1, [e["line"] for e in mine]
    if kind == "stream":  # the stream's own key (random per stream) keeps its handshake with it
        streams = [e for e in entries if e["status"] == "101"]
        assert len(streams) == 3
        for stream in streams:
            same_key = [e for e in entries if e["route"] == stream["route"]]
            assert {e["upstream"] for e in same_key} == {stream["upstream"]}


def _holder(deployment: Deployment, opened_before: dict[str, int]) -> Replica:
    """The replica that logged a new ``session opened`` since ``opened_before`` was taken."""
    counts = {r.address: r.log.read_text().count('"session opened"') for r in deployment.replicas}
    grown = [r for r in deployment.replicas if counts[r.address] > opened_before[r.address]]
    assert len(grown) == 1, counts
    return grown[0]


@pytest.mark.parametrize(
    ("mode", "kind"),
    # a replica's drain without a proxy: tests/scaleout/test_drain.py; through nginx: aesgcm-stream
    [pytest.param("plain", "http", marks=pytest.mark.exhaustive), ("aesgcm", "stream")],
)
def test_sigterm_mid_generation_finishes_it_refuses_new_sessions_and_exits_0(
    make_deployment: object, tiny: Checkpoint, mode: str, kind: str
) -> None:
    deployment: Deployment = make_deployment(mode)  # type: ignore[operator]
    expected = generate(deployment, tiny, "http", url=deployment.replicas[0].url)
    opened = {r.address: r.log.read_text().count('"session opened"') for r in deployment.replicas}
    seen: dict[str, object] = {}

    def sigterm_the_holder(message: int) -> None:
        if message != 6:  # a few steps into the generation
            return
        holder = _holder(deployment, opened)
        holder.signal(signal.SIGTERM)
        with connect(deployment, holder.url) as direct:
            for _ in range(200):  # the signal is asynchronous: wait until the drain has begun
                health = direct.exchange(Request("GET", "/healthz"))
                if health.status == 503:
                    break
                time.sleep(0.05)
            refused = direct.exchange(Request("POST", "/v1/sessions", b'{"wire": "fp32"}'))
        seen.update(holder=holder, health=(health.status, json.loads(health.content)))
        seen["open"] = (refused.status, json.loads(refused.content)["error"]["code"])

    tap = Tap(connect(deployment), sigterm_the_holder)
    with SplitClient.from_transport(tap, tiny, transport_kind=kind) as client:  # type: ignore[arg-type]
        assert list(client.generate(PROMPT, GREEDY).token_ids[0]) == expected
    assert seen["health"] == (503, {"status": "draining"})
    assert seen["open"] == (503, "draining")
    holder = seen["holder"]
    assert isinstance(holder, Replica)
    assert wait_exit(holder, 60) == 0  # the generation ended, so did the drain
    others = [r for r in deployment.replicas if r is not holder]
    assert all(r.process.poll() is None for r in others)
    assert generate(deployment, tiny, kind) == expected  # the pool still serves, without it


def _probes(bodies: list[bytes]) -> list[bytes]:
    """32-byte pieces of the plaintext step frames the device sent (hidden states, mostly)."""
    return [b[len(b) // 2 : len(b) // 2 + 32] for b in bodies if len(b) >= 256]


@pytest.mark.parametrize("deployment", ["aesgcm", "plain"], indirect=True)
def test_an_eavesdropper_on_either_leg_sees_only_sealed_records_in_aesgcm(
    deployment: Deployment, tiny: Checkpoint
) -> None:
    """Device-proxy and proxy-replica legs, captured off loopback. ``plain`` is the control: the
    same probes must find the hidden states there, on both legs."""
    mode = deployment.mode
    replica_ports = {int(r.address.rsplit(":", 1)[1]) for r in deployment.replicas}
    taps: list[Tap] = []
    texts: list[str] = []
    with capture_loopback({deployment.nginx.port, *replica_ports}, method="af_packet") as capture:
        for kind in ("http", "stream"):
            taps.append(Tap(connect(deployment)))
            with SplitClient.from_transport(taps[-1], tiny, transport_kind=kind) as client:  # type: ignore[arg-type]
                texts.append(client.generate(PROMPT, GREEDY).texts[0])
        time.sleep(0.5)  # let the last FINs and the proxy's log reach the capture
    streams = capture.streams()
    legs = {
        "device-proxy": [s for s in streams if s.server[1] == deployment.nginx.port],
        "proxy-replica": [s for s in streams if s.server[1] in replica_ports],
    }
    probes = _probes([body for tap in taps for body in tap.bodies])
    assert probes and all(legs.values()), {k: len(v) for k, v in legs.items()}
    for leg, conversations in legs.items():
        wire = b"".join(s.c2s.data + s.s2c.data for s in conversations)
        found = [p for p in probes if p in wire]
        if mode == "plain":
            assert found, f"control: the {leg} capture must show plain hidden states"
            continue
        assert not found, f"{len(found)} plaintext frame pieces on the {leg} leg"
        secrets = [PROMPT, *(t for t in texts if len(t) >= 8)]
        assert scan_streams([TextLeakDetector(secrets)], conversations) == []
    if mode == "aesgcm":  # what each leg is: TLS to the proxy, sealed records behind it
        proxied = b"".join(s.c2s.data for s in legs["proxy-replica"])
        assert b"POST /v1/secure" in proxied and b"/v1/sessions" not in proxied
        assert b"/v1/secure" not in b"".join(s.c2s.data for s in legs["device-proxy"])


@pytest.mark.parametrize("deployment", ["aesgcm"], indirect=True)
def test_aesgcm_through_the_tls_terminating_proxy_trusts_the_system_store_only(
    deployment: Deployment, tiny: Checkpoint, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An ``https://`` URL in ``aesgcm`` mode: TLS to the proxy, checked against the system trust
    store (SSL_CERT_FILE here, the proxy's CA), the AES-GCM channel inside it to the replica."""
    direct = generate(deployment, tiny, "http", url=deployment.replicas[0].url)
    monkeypatch.delenv("SSL_CERT_FILE", raising=False)
    with pytest.raises(AuthenticationError, match="certificate"):
        connect_transport(deployment.url, "aesgcm", keys_dir=deployment.keys).exchange(
            Request("GET", "/v1/info")
        )
    monkeypatch.setenv("SSL_CERT_FILE", str(deployment.proxy_ca))
    transport = connect_transport(deployment.url, "aesgcm", keys_dir=deployment.keys)
    with SplitClient.from_transport(transport, tiny) as client:
        assert list(client.generate(PROMPT, GREEDY).token_ids[0]) == direct
