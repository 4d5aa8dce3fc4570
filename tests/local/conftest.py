"""A live trunk server (tls+aesgcm, tiny-random-llama) and local endpoints in front of it."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest

from lambda_split import Checkpoint, SplitClient
from lambda_split.local_api import BackgroundLocal, ConversationCache, LocalEngine, build_app
from tests.secure_channel.conftest import PKI
from tests.server.conftest import LiveServer, server_pki, start_server, wait_for  # noqa: F401 (fixture)

MODE = "tls+aesgcm"


@pytest.fixture(scope="session")
def trunk(tiny: Checkpoint, server_pki: PKI) -> Iterator[LiveServer]:  # noqa: F811
    server = start_server(tiny, MODE, server_pki.root)
    yield server
    server.stop()


@pytest.fixture(scope="session", params=["http", "stream"])
def split_client(request: pytest.FixtureRequest, trunk: LiveServer) -> Iterator[SplitClient]:
    """A client of ``trunk``, over each link: one request per step, or one persistent stream."""
    with SplitClient.connect(
        trunk.url, security=MODE, keys=trunk.keys, model="tiny-random-llama", transport_kind=request.param
    ) as client:
        yield client


@pytest.fixture(scope="session")
def http_client(trunk: LiveServer) -> Iterator[SplitClient]:
    with SplitClient.connect(
        trunk.url, security=MODE, keys=trunk.keys, model="tiny-random-llama", transport_kind="http"
    ) as client:
        yield client


@pytest.fixture
def make_local(http_client: SplitClient) -> Iterator[Callable[..., tuple[BackgroundLocal, LocalEngine]]]:
    """Start a local endpoint: ``make_local(client=..., conversations=4, api_key=None)``."""
    started: list[BackgroundLocal] = []

    def make(
        client: SplitClient | None = None,
        *,
        conversations: int = 4,
        idle_s: float = 300.0,
        default_max_tokens: int = 512,
        **app: Any,
    ) -> tuple[BackgroundLocal, LocalEngine]:
        cache = ConversationCache(conversations, idle_s)
        engine = LocalEngine(client or http_client, cache, default_max_tokens=default_max_tokens)
        started.append(BackgroundLocal(build_app(engine, **app)))
        return started[-1], engine

    yield make
    for local in started:
        local.stop()
