"""Live trunk servers on loopback, one per security mode, sharing one tiny model."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import pytest

from lambda_split import Checkpoint, TrunkService, load_llm_service
from server import BackgroundServer, ServerConfig
from tests.secure_channel.conftest import PKI

MODES = ("plain", "tls", "aesgcm", "tls+aesgcm")


@dataclass
class LiveServer:
    mode: str
    url: str
    keys: Path
    service: TrunkService
    running: BackgroundServer

    def stop(self) -> None:
        self.running.stop()


def start_server(
    checkpoint: Checkpoint | str, mode: str, keys: Path, split: str = "2:-2", **limits: Any
) -> LiveServer:
    """Serve ``checkpoint`` (an LLM checkpoint, or a diffusion model name) on a free loopback port."""
    name = checkpoint if isinstance(checkpoint, str) else checkpoint.name
    config = replace(ServerConfig(model=name, split=split, security=mode, keys=str(keys), port=0), **limits)
    service: tuple[Any, dict[str, Any]]
    if isinstance(checkpoint, str):
        from lambda_split.diffusion import load_diffusion_service

        service = load_diffusion_service(checkpoint, security=mode, limits=config.service_limits())
    else:
        service = load_llm_service(checkpoint, split, security=mode, limits=config.service_limits())
    running = BackgroundServer(config, service)
    return LiveServer(mode, running.url, keys, service[0], running)


@pytest.fixture(scope="session")
def server_pki(tmp_path_factory: pytest.TempPathFactory) -> PKI:
    return PKI.create(tmp_path_factory.mktemp("server-pki"))


@pytest.fixture(scope="session")
def second_client(server_pki: PKI, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Credentials of another client under the same CA: a different authenticated identity."""
    directory = tmp_path_factory.mktemp("bob")
    server_pki.issue("client", "client", ["bob"], directory=directory)
    return directory


@pytest.fixture(scope="session")
def live(tiny: Checkpoint, server_pki: PKI) -> Iterator[dict[str, LiveServer]]:
    servers = {mode: start_server(tiny, mode, server_pki.root) for mode in MODES}
    yield servers
    for server in servers.values():
        server.stop()


@pytest.fixture
def make_server(tiny: Checkpoint, server_pki: PKI) -> Iterator[Callable[..., LiveServer]]:
    started: list[LiveServer] = []

    def make(mode: str = "plain", **limits: Any) -> LiveServer:
        started.append(start_server(tiny, mode, server_pki.root, **limits))
        return started[-1]

    yield make
    for server in started:
        server.stop()


def wait_for(condition: Callable[[], bool], timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.05)
    return condition()
