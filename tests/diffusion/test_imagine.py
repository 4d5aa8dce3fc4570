"""The imagine command body, and a local diffusers directory through the same code path."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from lambda_split import LocalTransport
from lambda_split.diffusion import DiffusionClient, imagine, load_diffusion_service, resolve_diffusion


def test_imagine_writes_a_png_and_reports_progress(local: Any, services: Any, tmp_path: Path) -> None:
    times = services["tiny-random-sd"][0].step_times  # the service's /metrics step histograms
    denoised = times["denoise"].count
    seen: list[tuple[int, int]] = []
    stats = imagine(
        local("tiny-random-sd"),
        "a red fox",
        4,
        11,
        tmp_path / "fox.png",
        lambda done, total: seen.append((done, total)),
    )
    image = Image.open(stats.path)
    assert image.format == "PNG" and image.size == (stats.width, stats.height) == (64, 64)
    assert seen == [(1, 4), (2, 4), (3, 4), (4, 4)]
    assert stats.trunk_calls == 4 and stats.bytes_sent > 0 and stats.bytes_received > 0 and stats.seconds > 0
    # (one frame may ask the server for several U-Net calls: at least one step, none of an LLM's kinds)
    assert times["denoise"].count > denoised and times["decode"].count == times["prefill"].count == 0


def test_imagine_refuses_a_non_png_path(local: Any, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="png"):
        imagine(local("tiny-random-sd"), "a red fox", 2, 0, tmp_path / "fox.jpg", None)


def test_a_pipeline_directory_splits_exactly(tmp_path: Path) -> None:
    tiny = resolve_diffusion("tiny-random-sdxl")
    tiny.monolithic().save_pretrained(tmp_path / "pipe")
    source = resolve_diffusion(str(tmp_path / "pipe"))
    assert source.pipeline == "sdxl" and source.fingerprint.startswith("sha256:")
    expected = source.monolithic()(
        "a red fox",
        num_inference_steps=2,
        guidance_scale=3.0,
        generator=torch.Generator().manual_seed(5),
        output_type="np",
    ).images
    service, info = load_diffusion_service(str(tmp_path / "pipe"), security="plain")
    assert info["fingerprint"] == source.fingerprint and info["pipeline"] == "sdxl"
    client = DiffusionClient.from_transport(LocalTransport(service, info), str(tmp_path / "pipe"))
    result = client.generate("a red fox", steps=2, seed=5, guidance_scale=3.0, output_type="np")
    np.testing.assert_array_equal(result.images[0], expected[0])
