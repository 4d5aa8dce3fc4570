from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest
import torch

from lambda_split import LocalTransport
from lambda_split.diffusion import DiffusionLimits, DiffusionSource, load_diffusion_service, resolve_diffusion

Connect = Callable[..., LocalTransport]


@pytest.fixture(autouse=True)
def one_thread() -> Iterator[None]:
    """Tiny models run fastest on one thread, and far faster than two when the CPU is shared."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def sources() -> dict[str, DiffusionSource]:
    return {name: resolve_diffusion(name) for name in ("tiny-random-sd", "tiny-random-sdxl")}


@pytest.fixture(scope="session")
def services() -> dict[str, Any]:
    return {
        name: load_diffusion_service(name, security="plain")
        for name in ("tiny-random-sd", "tiny-random-sdxl")
    }


@pytest.fixture
def local(services: dict[str, Any]) -> Connect:
    """A fresh in-process transport to the named tiny model's U-Net service."""

    def connect(name: str) -> LocalTransport:
        service, info = services[name]
        return LocalTransport(service, info)

    return connect


@pytest.fixture
def strict_service() -> Any:
    """A tiny-random-sdxl service that allows only three U-Net steps per session."""
    return load_diffusion_service(
        "tiny-random-sdxl", security="plain", diffusion_limits=DiffusionLimits(max_steps_per_session=3)
    )
