"""Split generation gives exactly the monolithic diffusers pipeline's image at fp32."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch

from lambda_split.diffusion import DiffusionClient, DiffusionSource, make_scheduler

PROMPT = "a lighthouse on a cliff at dusk"


def monolithic_image(source: DiffusionSource, scheduler: str, guidance: float, steps: int = 3) -> np.ndarray:
    pipe = source.monolithic()
    pipe.scheduler = make_scheduler(scheduler, pipe.scheduler.config)
    return pipe(
        PROMPT,
        num_inference_steps=steps,
        guidance_scale=guidance,
        generator=torch.Generator().manual_seed(7),
        output_type="np",
    ).images


@pytest.mark.parametrize("name", ["tiny-random-sd", "tiny-random-sdxl"])
@pytest.mark.parametrize("scheduler", ["EulerDiscreteScheduler", "DDIMScheduler"])
@pytest.mark.parametrize("guidance", [5.0, 1.0])
@pytest.mark.parametrize("on_server", [True, False], ids=["latents-on-server", "per-step"])
def test_fp32_split_is_pixel_identical(
    sources: dict[str, DiffusionSource],
    local: Any,
    name: str,
    scheduler: str,
    guidance: float,
    on_server: bool,
) -> None:
    expected = monolithic_image(sources[name], scheduler, guidance)
    client = DiffusionClient.from_transport(local(name), sources[name], wire="fp32")
    result = client.generate(
        PROMPT,
        steps=3,
        seed=7,
        guidance_scale=guidance,
        scheduler=scheduler,
        output_type="np",
        latents_on_server=on_server,
    )
    assert result.trunk_calls == 3 and result.latents_on_server is on_server
    np.testing.assert_array_equal(result.images[0], expected[0])


def test_second_order_scheduler_calls_the_trunk_per_model_evaluation(
    sources: dict[str, DiffusionSource], local: Any
) -> None:
    source = sources["tiny-random-sd"]
    expected = monolithic_image(source, "HeunDiscreteScheduler", 4.0)
    client = DiffusionClient.from_transport(local("tiny-random-sd"), source)
    result = client.generate(
        PROMPT, steps=3, seed=7, guidance_scale=4.0, scheduler="HeunDiscreteScheduler", output_type="np"
    )
    assert result.trunk_calls == 5  # Heun: two U-Net calls per step but the last
    assert result.latents_on_server
    np.testing.assert_array_equal(result.images[0], expected[0])


def test_per_step_context_crosses_once_per_session(sources: dict[str, DiffusionSource], local: Any) -> None:
    from lambda_split.diffusion import RecordingTransport, captured_steps
    from lambda_split.protocol import FrameKind, decode_frame

    tap = RecordingTransport(local("tiny-random-sdxl"))
    client = DiffusionClient.from_transport(tap, sources["tiny-random-sdxl"])
    client.generate(PROMPT, steps=4, seed=1, latents_on_server=False)
    kinds = [
        decode_frame(request.content).kind for request, _ in tap.records if request.path.endswith("/step")
    ]
    assert kinds == [FrameKind.DIFFUSION_CONTEXT] + [FrameKind.DIFFUSION_STEP] * 4
    assert len(captured_steps(tap.bodies())) == 4
    bodies = b"".join(request.content for request, _ in tap.records)
    assert PROMPT.encode() not in bodies
