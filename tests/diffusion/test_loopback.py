"""The diffusion split through a real trunk server on loopback: pixel-identical in every mode."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest

from lambda_split import LocalTransport
from lambda_split.diffusion import DiffusionClient, DiffusionSource
from tests.diffusion.test_split_exact import PROMPT, monolithic_image
from tests.secure_channel.conftest import PKI
from tests.server.conftest import MODES, LiveServer, start_server


@pytest.fixture(scope="module")
def diffusion_servers(
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[dict[tuple[str, str], LiveServer]]:
    pki = PKI.create(tmp_path_factory.mktemp("diffusion-pki"))
    servers = {
        (name, mode): start_server(name, mode, pki.root)
        for name in ("tiny-random-sd", "tiny-random-sdxl")
        for mode in MODES
    }
    yield servers
    for server in servers.values():
        server.stop()


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("name", ["tiny-random-sd", "tiny-random-sdxl"])
@pytest.mark.parametrize("guidance", [5.0, 1.0])
def test_every_mode_gives_the_monolithic_image(
    diffusion_servers: dict[tuple[str, str], LiveServer],
    sources: dict[str, DiffusionSource],
    name: str,
    mode: str,
    guidance: float,
) -> None:
    server = diffusion_servers[(name, mode)]
    keys = None if mode == "plain" else server.keys
    expected = monolithic_image(sources[name], "EulerDiscreteScheduler", guidance)
    with DiffusionClient.connect(server.url, security=mode, keys=keys, model=sources[name]) as client:  # type: ignore[arg-type]
        result = client.generate(PROMPT, steps=3, seed=7, guidance_scale=guidance, output_type="np")
    np.testing.assert_array_equal(result.images[0], expected[0])
    assert result.bytes_sent > 0 and result.bytes_received > 0 and result.latents_on_server


@pytest.mark.parametrize("mode", ["plain", "tls+aesgcm"])
@pytest.mark.parametrize("kind", ["stream", "http"])
@pytest.mark.parametrize("wire", ["fp32", "int8"])
@pytest.mark.parametrize("on_server", [True, False], ids=["latents-on-server", "per-step"])
def test_the_stream_and_the_http_path_give_the_same_pixels(
    diffusion_servers: dict[tuple[str, str], LiveServer],
    sources: dict[str, DiffusionSource],
    services: dict[str, Any],
    mode: str,
    kind: str,
    wire: str,
    on_server: bool,
) -> None:
    """Both links, both ways of running the loop; on int8 the two links must agree with each other."""
    from lambda_split import HTTPLink, StreamLink

    server = diffusion_servers[("tiny-random-sd", mode)]
    keys = None if mode == "plain" else server.keys
    local = DiffusionClient.from_transport(
        LocalTransport(*services["tiny-random-sd"]), sources["tiny-random-sd"], wire=wire
    )
    expected = local.generate(
        PROMPT, steps=3, seed=7, guidance_scale=5.0, output_type="np", latents_on_server=on_server
    ).images
    if wire == "fp32":
        np.testing.assert_array_equal(
            expected[0], monolithic_image(sources["tiny-random-sd"], "EulerDiscreteScheduler", 5.0)[0]
        )
    with DiffusionClient.connect(
        server.url,
        security=mode,  # type: ignore[arg-type]
        keys=keys,
        model=sources["tiny-random-sd"],
        wire=wire,
        transport_kind=kind,  # type: ignore[arg-type]
    ) as client:
        assert isinstance(client.link, StreamLink if kind == "stream" else HTTPLink)
        result = client.generate(
            PROMPT, steps=3, seed=7, guidance_scale=5.0, output_type="np", latents_on_server=on_server
        )
    assert result.latents_on_server is on_server
    np.testing.assert_array_equal(result.images[0], expected[0])
