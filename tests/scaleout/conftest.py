"""Deployments for the reverse-proxy tests: nginx from deploy/nginx in front of real replicas."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from secure_channel import Transport, connect_transport
from tests.scaleout.harness import Deployment, Nginx, Replica
from tests.secure_channel.conftest import PKI

#: Which configuration of deploy/nginx serves which security mode.
TEMPLATES = {
    "plain": "http-affinity",
    "aesgcm": "aesgcm-tls-terminating",
    "tls": "tls-passthrough",
    "tls+aesgcm": "tls-passthrough",
}
PROXY_SCHEME = {"plain": "http", "aesgcm": "https", "tls": "https", "tls+aesgcm": "https"}


@pytest.fixture(scope="session")
def device_pki(tmp_path_factory: pytest.TempPathFactory) -> PKI:
    """The Λ-Split CA: replica and device credentials (the replica certificate names 127.0.0.1)."""
    return PKI.create(tmp_path_factory.mktemp("lambda-pki"))


@pytest.fixture(scope="session")
def proxy_pki(tmp_path_factory: pytest.TempPathFactory) -> PKI:
    """Another CA, standing in for a public one: only the proxy's TLS certificate comes from it."""
    return PKI.create(tmp_path_factory.mktemp("proxy-pki"))


def start_deployment(
    mode: str, root: Path, device_pki: PKI, proxy_pki: PKI, replicas: int = 2, **env: str
) -> Deployment:
    root.mkdir(parents=True, exist_ok=True)
    logs = [root / f"replica{number}.log" for number in range(replicas)]
    started = Replica.start_many(mode, device_pki.root, logs, env)
    try:
        values = {}
        if mode == "aesgcm":
            values = {"CERT": str(proxy_pki.root / "server.pem"), "KEY": str(proxy_pki.root / "server.key")}
        nginx = Nginx.start(TEMPLATES[mode], root / "nginx", [r.address for r in started], **values)
    except BaseException:
        for replica in started:
            replica.stop()
        raise
    url = f"{PROXY_SCHEME[mode]}://127.0.0.1:{nginx.port}"
    proxy_ca = proxy_pki.root / "ca.pem" if mode == "aesgcm" else None
    return Deployment(mode, nginx, started, url, device_pki.root, proxy_ca)


def connect(deployment: Deployment, url: str | None = None) -> Transport:
    """A device transport to the proxy (or to ``url``, a replica) in the deployment's mode."""
    target = url or deployment.url
    proxy_ca = deployment.proxy_ca if target == deployment.url else None
    return connect_transport(target, deployment.mode, keys_dir=deployment.keys, proxy_ca=proxy_ca)


@pytest.fixture
def make_deployment(tmp_path: Path, device_pki: PKI, proxy_pki: PKI) -> Iterator[Callable[..., Deployment]]:
    made: list[Deployment] = []

    def make(mode: str, replicas: int = 2, **env: str) -> Deployment:
        made.append(
            start_deployment(mode, tmp_path / f"d{len(made)}", device_pki, proxy_pki, replicas, **env)
        )
        return made[-1]

    yield make
    for deployment in made:
        deployment.stop()
