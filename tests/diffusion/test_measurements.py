"""Measurements, not timed assertions: image error per wire encoding, and what a plain-mode eavesdropper sees.

Run with ``-s`` to print the tables.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from lambda_split.diffusion import (
    DiffusionClient,
    DiffusionSource,
    RecordingTransport,
    captured_steps,
    eavesdrop_decode,
    psnr,
    ssim,
)

PROMPT = "a lighthouse on a cliff at dusk"
STEPS = 6


def render(sources: dict[str, DiffusionSource], local: Any, name: str, wire: str) -> tuple[np.ndarray, int]:
    client = DiffusionClient.from_transport(local(name), sources[name], wire=wire)
    result = client.generate(PROMPT, steps=STEPS, seed=3, guidance_scale=5.0, output_type="np")
    return result.images[0], result.bytes_sent + result.bytes_received


@pytest.mark.parametrize("name", ["tiny-random-sd", "tiny-random-sdxl"])
def test_wire_encoding_image_error(
    sources: dict[str, DiffusionSource], local: Any, name: str, record_property: Any
) -> None:
    reference, reference_bytes = render(sources, local, name, "fp32")
    print(f"\n{name}: {STEPS} steps, guidance 5.0, fp32 wire {reference_bytes} B")
    for wire in ("fp16", "bf16", "int8"):
        image, wire_bytes = render(sources, local, name, wire)
        score_psnr, score_ssim = psnr(image, reference), ssim(image, reference)
        print(f"  {wire:5s} PSNR {score_psnr:6.2f} dB  SSIM {score_ssim:.5f}  wire {wire_bytes} B")
        record_property(f"{wire}_psnr", score_psnr)
        record_property(f"{wire}_ssim", score_ssim)
        assert np.isfinite(image).all() and -1.0 <= score_ssim <= 1.0
        assert wire_bytes < reference_bytes


def test_metrics_know_identity_and_difference() -> None:
    rng = np.random.default_rng(0)
    image = rng.random((32, 32, 3), dtype=np.float32)
    assert psnr(image, image) == float("inf") and ssim(image, image) == pytest.approx(1.0)
    noisy = np.clip(image + rng.normal(0, 0.1, image.shape).astype(np.float32), 0, 1)
    assert 15 < psnr(noisy, image) < 25 and ssim(noisy, image) < 0.95


@pytest.mark.parametrize("name", ["tiny-random-sd", "tiny-random-sdxl"])
def test_plain_mode_eavesdropper_decodes_every_step(
    sources: dict[str, DiffusionSource], local: Any, name: str
) -> None:
    tap = RecordingTransport(local(name))
    client = DiffusionClient.from_transport(tap, sources[name])
    final = client.generate(PROMPT, steps=STEPS, seed=3, guidance_scale=5.0, output_type="np").images[0]
    pipe = client.pipeline
    leaks = eavesdrop_decode(
        pipe.vae, pipe.scheduler.config, captured_steps(tap.bodies()), final, guidance_scale=5.0
    )
    print(f"\n{name}: step  timestep  SSIM(raw latents)  SSIM(predicted x0)  PSNR(x0)")
    for leak in leaks:
        print(
            f"  {leak.step:4d}  {leak.timestep:8.1f}  {leak.ssim_latents:17.4f}  {leak.ssim_x0:18.4f}"
            f"  {leak.psnr_x0:8.2f}"
        )
    assert len(leaks) == STEPS
    assert all(-1.0 <= leak.ssim_latents <= 1.0 and -1.0 <= leak.ssim_x0 <= 1.0 for leak in leaks)
