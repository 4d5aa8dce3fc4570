"""One identity per device: devices are separated, and a revoked device is cut off while the server runs."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from lambda_split import Checkpoint, HTTPLink, RemoteTrunk, ServerError
from lambda_split.protocol import Encoding
from secure_channel import (
    AuthenticationError,
    CertificateAuthority,
    Request,
    ServerBusy,
    Transport,
    TransportError,
    cert_identity,
    connect_transport,
    generate_credentials,
    load_credentials,
)
from tests.server.conftest import LiveServer, start_server, wait_for

SECURE_MODES = ("tls", "aesgcm", "tls+aesgcm")


@dataclass
class Devices:
    ca: Path
    alice: Path
    bob: Path

    def identity(self, keys: Path) -> str:
        return cert_identity(load_credentials(keys, "client").cert)


def make_devices(root: Path) -> Devices:
    generate_credentials(root / "ca", days=2)
    ca = CertificateAuthority.open(root / "ca")
    ca.add_client("alice", root / "alice", days=2)
    ca.add_client("bob", root / "bob", days=2)
    return Devices(root / "ca", root / "alice", root / "bob")


@pytest.fixture
def devices(tmp_path: Path) -> Devices:
    return make_devices(tmp_path)


@pytest.fixture
def servers(tiny: Checkpoint, devices: Devices) -> Iterator[dict[str, LiveServer]]:
    running = {
        mode: start_server(tiny, mode, devices.ca, rate_limit_per_s=0.01, rate_limit_burst=4)
        for mode in SECURE_MODES
    }
    yield running
    for server in running.values():
        server.stop()


def info(transport: Transport) -> int:
    return transport.exchange(Request("GET", "/v1/info")).status


@pytest.mark.parametrize("mode", SECURE_MODES)
def test_two_devices_are_two_identities_with_their_own_sessions_and_limits(
    servers: dict[str, LiveServer], devices: Devices, mode: str
) -> None:
    server = servers[mode]
    with (
        connect_transport(server.url, mode, keys_dir=devices.alice) as alice,
        connect_transport(server.url, mode, keys_dir=devices.bob) as bob,
    ):
        session = RemoteTrunk(alice, Encoding.FP32)
        stolen = RemoteTrunk.__new__(RemoteTrunk)
        stolen.__dict__.update(session.__dict__, link=HTTPLink(bob))
        with pytest.raises(ServerError) as refused:
            stolen.close()
        assert refused.value.status == 404
        statuses = [info(alice) for _ in range(5)]  # a bucket holds 4 tokens
        assert statuses[-1] == 429  # alice's bucket runs dry ...
        assert info(bob) == 200  # ... bob's does not
        assert devices.identity(devices.alice) != devices.identity(devices.bob)


@pytest.mark.parametrize("mode", SECURE_MODES)
def test_a_revoked_device_is_cut_off_at_reload_and_the_other_is_not(
    servers: dict[str, LiveServer], devices: Devices, mode: str
) -> None:
    server = servers[mode]
    alice_id = devices.identity(devices.alice)
    owners = lambda: {s.owner for s in server.service._sessions.values()}  # noqa: E731
    with (
        connect_transport(server.url, mode, keys_dir=devices.alice) as alice,
        connect_transport(server.url, mode, keys_dir=devices.bob) as bob,
    ):
        RemoteTrunk(alice, Encoding.FP32)  # live sessions, and live connections / channel sessions
        bobs = RemoteTrunk(bob, Encoding.FP32)
        assert alice_id in owners()
        CertificateAuthority.open(devices.ca).revoke("alice")
        server.running.server.request_reload()  # what SIGHUP does
        assert wait_for(lambda: alice_id not in owners())  # her trunk session is closed
        # Her connection or channel session is gone: the old TLS connection may break off as the
        # server closes it (TransportError) or be found closed and replaced by a refused handshake.
        with pytest.raises((AuthenticationError, TransportError)):
            info(alice)
        with (
            pytest.raises(AuthenticationError),
            connect_transport(server.url, mode, keys_dir=devices.alice) as again,
        ):
            info(again)
        assert info(bob) == 200
        bobs.close()  # bob's session survived


def test_sighup_reloads_the_crl_of_a_running_serve(devices: Devices, tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    proc = subprocess.Popen(
        [sys.executable, "-m", "lambda_split", "serve", "--model", "tiny-random-llama", "--security",
         "tls", "--keys", str(devices.ca), "--port", "0"],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env,
    )  # fmt: skip
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert line.startswith("listening on "), line
        url = line.split()[-1]
        with connect_transport(url, "tls", keys_dir=devices.alice) as alice:
            assert info(alice) == 200
        CertificateAuthority.open(devices.ca).revoke("alice")
        proc.send_signal(signal.SIGHUP)

        def refused() -> bool:
            try:
                with connect_transport(url, "tls", keys_dir=devices.alice) as alice:
                    info(alice)
            except AuthenticationError:
                return True
            return False

        assert wait_for(refused)
        with connect_transport(url, "tls", keys_dir=devices.bob) as bob:
            assert info(bob) == 200
        assert proc.poll() is None  # SIGHUP reloads, it does not stop the server
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_keys_list_json_shows_states(devices: Devices, capsys: pytest.CaptureFixture[str]) -> None:
    from lambda_split.cli import main

    CertificateAuthority.open(devices.ca).revoke("alice")
    # in this process (a command's JSON on a real stdout: tests/test_cli.py)
    assert main(["keys", "list", str(devices.ca), "--json"]) == 0
    out = capsys.readouterr().out
    rows = {(r["role"], r["name"]): r for r in json.loads(out)["certificates"]}
    assert rows[("client", "alice")]["state"] == "revoked"
    assert rows[("client", "bob")]["state"] == "valid"
    assert rows[("server", "localhost")]["identity"].startswith("sha256:")


def test_one_device_cannot_take_every_session(tiny: Checkpoint, devices: Devices) -> None:
    server = start_server(tiny, "tls", devices.ca, max_sessions_per_identity=2)
    try:
        with (
            connect_transport(server.url, "tls", keys_dir=devices.alice) as alice,
            connect_transport(server.url, "tls", keys_dir=devices.bob) as bob,
        ):
            held = [RemoteTrunk(alice, Encoding.FP32) for _ in range(2)]
            with pytest.raises(ServerError) as refused:
                RemoteTrunk(alice, Encoding.FP32)
            assert refused.value.status == 429
            RemoteTrunk(bob, Encoding.FP32).close()  # bob is not starved
            for session in held:
                session.close()
    finally:
        server.stop()


@pytest.mark.parametrize(("trusted", "expected"), [("", 429), ("127.0.0.1", 200)])
def test_forwarded_for_is_believed_only_from_configured_proxies(
    tiny: Checkpoint, devices: Devices, trusted: str, expected: int
) -> None:
    server = start_server(
        tiny, "plain", devices.ca, rate_limit_per_s=0.01, rate_limit_burst=3, trusted_proxies=trusted
    )
    try:
        with connect_transport(server.url, "plain") as client:
            statuses = [
                client.exchange(
                    Request("GET", "/v1/info", headers={"x-forwarded-for": f"203.0.113.{i}"})
                ).status
                for i in range(4)
            ]
        # untrusted: all four count against this one loopback address; trusted: four "different" clients
        assert statuses[-1] == expected
    finally:
        server.stop()


def test_one_handshake_costs_one_token(tiny: Checkpoint, devices: Devices) -> None:
    server = start_server(tiny, "aesgcm", devices.ca, handshake_rate_per_s=0.01, handshake_burst=3)
    try:
        for _ in range(3):  # msg1 and msg3 used to cost a token each: the second handshake failed
            with connect_transport(server.url, "aesgcm", keys_dir=devices.alice) as alice:
                assert info(alice) == 200
        with (
            pytest.raises(ServerBusy, match="rate_limited") as busy,
            connect_transport(server.url, "aesgcm", keys_dir=devices.bob) as bob,
        ):
            info(bob)  # the fourth handshake from this address is refused
        assert busy.value.retry_after is not None and busy.value.retry_after > 5  # no retry
    finally:
        server.stop()
