"""Latents on the server: lock-step on every wire, fewer bytes and round trips, fallback to per-step."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch

from lambda_split import LocalTransport, ProtocolMismatch
from lambda_split.diffusion import (
    DiffusionClient,
    DiffusionSource,
    RecordingTransport,
    ServerLoop,
    captured_steps,
)
from lambda_split.protocol import FrameKind, decode_frame
from tests.diffusion.test_split_exact import PROMPT, monolithic_image


def kinds(tap: RecordingTransport) -> list[FrameKind]:
    return [decode_frame(req.content).kind for req, _ in tap.records if req.path.endswith("/step")]


@pytest.mark.parametrize("name", ["tiny-random-sd", "tiny-random-sdxl"])
def test_only_the_first_frame_carries_latents(
    sources: dict[str, DiffusionSource], local: Any, name: str
) -> None:
    tap = RecordingTransport(local(name))
    client = DiffusionClient.from_transport(tap, sources[name])
    assert client.info.max_calls_per_frame == 8
    result = client.generate(PROMPT, steps=10, seed=1)
    assert result.latents_on_server and result.trunk_calls == 10
    assert kinds(tap) == [FrameKind.DIFFUSION_BEGIN, FrameKind.DIFFUSION_ADVANCE]  # calls 1-8, then 9-10
    frames = [decode_frame(req.content) for req, _ in tap.records if req.path.endswith("/step")]
    assert set(frames[0].tensors) >= {"encoder_hidden_states", "noise", "params", "scheduler"}
    assert tuple(frames[0].tensors["noise"].shape) == (1, 4, 32, 32)  # one row, not both guidance halves
    assert frames[0].tensors["params"].tolist() == [10.0, 5.0, 0.0, 8.0]
    assert set(frames[1].tensors) == {"step"} and frames[1].tensors["step"].tolist() == [8.0, 2.0]
    replies = [decode_frame(response.content) for req, response in tap.records if req.path.endswith("/step")]
    assert [tuple(reply.tensors["noise_pred"].shape) for reply in replies] == [(8, 4, 32, 32), (2, 4, 32, 32)]
    assert [tuple(reply.tensors["input_digest"].shape) for reply in replies] == [(8, 64), (2, 64)]
    assert PROMPT.encode() not in b"".join(request.content for request, _ in tap.records)


@pytest.mark.parametrize("name", ["tiny-random-sd", "tiny-random-sdxl"])
@pytest.mark.parametrize("wire", ["fp16", "bf16", "int8"])
def test_quantised_wires_keep_device_and_server_in_lock_step(
    sources: dict[str, DiffusionSource], local: Any, name: str, wire: str
) -> None:
    """The server's latents after its last step equal the device's final latents, bit for bit."""
    tap = RecordingTransport(local(name))
    client = DiffusionClient.from_transport(tap, sources[name], wire=wire)
    scheduler = "EulerAncestralDiscreteScheduler"  # its step draws noise: the generator state must cross too
    result = client.generate(PROMPT, steps=5, seed=2, scheduler=scheduler, output_type="latent")
    assert result.latents_on_server and result.trunk_calls == 5
    loop = replayed_loop(tap)
    loop.advance()  # the step the server never needs: the device decodes these latents
    assert torch.equal(loop.latents, result.images[0][None])


def replayed_loop(tap: RecordingTransport) -> ServerLoop:
    """The server's loop as its frames define it (what the eavesdrop replay rebuilds)."""
    from lambda_split.diffusion._eavesdrop import _replay

    pairs = [
        (decode_frame(q.content), decode_frame(r.content)) for q, r in tap.records if q.path.endswith("/step")
    ]
    loop = _replay(pairs[0][0])
    rows = loop.latents.shape[0]
    for index, noise in enumerate(torch.cat([reply.tensors["noise_pred"] for _, reply in pairs]).split(rows)):
        if index:
            loop.advance()
        loop.model_input()
        loop.received = noise
    return loop


def test_a_server_that_runs_one_call_per_frame(sources: dict[str, DiffusionSource]) -> None:
    from lambda_split.diffusion import DiffusionLimits, load_diffusion_service

    service, info = load_diffusion_service(
        "tiny-random-sd", security="plain", diffusion_limits=DiffusionLimits(max_calls_per_frame=1)
    )
    tap = RecordingTransport(LocalTransport(service, info))
    client = DiffusionClient.from_transport(tap, sources["tiny-random-sd"])
    result = client.generate(PROMPT, steps=3, seed=7, guidance_scale=5.0, output_type="np")
    assert result.latents_on_server and service.open_sessions == 0
    assert kinds(tap) == [FrameKind.DIFFUSION_BEGIN] + [FrameKind.DIFFUSION_ADVANCE] * 2
    expected = monolithic_image(sources["tiny-random-sd"], "EulerDiscreteScheduler", 5.0)
    np.testing.assert_array_equal(result.images[0], expected[0])


def test_a_server_out_of_lock_step_is_an_error_not_a_wrong_image(
    sources: dict[str, DiffusionSource], local: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    def record_unquantised(self: ServerLoop, guided: torch.Tensor) -> None:
        self.received = guided  # steps with noise the device never saw

    monkeypatch.setattr(ServerLoop, "record", record_unquantised)
    client = DiffusionClient.from_transport(local("tiny-random-sd"), sources["tiny-random-sd"], wire="int8")
    with pytest.raises(ProtocolMismatch, match=r"out of lock-step .* at U-Net call 2"):
        client.generate(PROMPT, steps=3, seed=2)


def per_image(
    client: DiffusionClient, tap: RecordingTransport, on_server: bool, steps: int
) -> tuple[int, int]:
    before = len(tap.records)
    result = client.generate(PROMPT, steps=steps, seed=5, latents_on_server=on_server, output_type="np")
    assert result.latents_on_server is on_server
    return result.bytes_sent + result.bytes_received, len(tap.records) - before


@pytest.mark.parametrize("name", ["tiny-random-sd", "tiny-random-sdxl"])
def test_bytes_and_round_trips_per_image(sources: dict[str, DiffusionSource], local: Any, name: str) -> None:
    """Run with -s for the table. Goal: at most 0.55x the per-step bytes, fewer round trips."""
    tap = RecordingTransport(local(name))
    client = DiffusionClient.from_transport(tap, sources[name])
    print(f"\n{name}, 20 steps, guidance 5.0: bytes and round trips per image")
    for wire in ("fp32", "int8"):
        client.wire = client.wire.parse(wire)
        old_bytes, old_trips = per_image(client, tap, False, 20)
        new_bytes, new_trips = per_image(client, tap, True, 20)
        print(
            f"  {wire}: per step {old_bytes} B / {old_trips} trips -> on server {new_bytes} B / {new_trips}"
        )
        assert new_bytes <= 0.55 * old_bytes and new_trips < old_trips


def test_an_older_server_gets_the_latents_every_step(
    services: dict[str, Any], sources: dict[str, DiffusionSource]
) -> None:
    service, info = services["tiny-random-sd"]
    older = {key: value for key, value in info.items() if key != "latents_on_server"}
    tap = RecordingTransport(LocalTransport(service, older))
    client = DiffusionClient.from_transport(tap, sources["tiny-random-sd"])
    result = client.generate(PROMPT, steps=3, seed=7, guidance_scale=5.0, output_type="np")
    assert not result.latents_on_server
    assert kinds(tap) == [FrameKind.DIFFUSION_CONTEXT] + [FrameKind.DIFFUSION_STEP] * 3
    expected = monolithic_image(sources["tiny-random-sd"], "EulerDiscreteScheduler", 5.0)
    np.testing.assert_array_equal(result.images[0], expected[0])
    with pytest.raises(ValueError, match="predates"):
        client.generate(PROMPT, steps=3, seed=7, latents_on_server=True)


def test_what_the_loop_cannot_reproduce_goes_per_step(
    sources: dict[str, DiffusionSource], local: Any
) -> None:
    client = DiffusionClient.from_transport(local("tiny-random-sd"), sources["tiny-random-sd"])
    result = client.generate(PROMPT, steps=2, seed=7, guidance_rescale=0.5, output_type="np")
    assert not result.latents_on_server
    with pytest.raises(ValueError, match="guidance_rescale"):
        client.generate(PROMPT, steps=2, seed=7, guidance_rescale=0.5, latents_on_server=True)
    assert client.generate(PROMPT, steps=2, seed=7, eta=0.5, scheduler="DDIMScheduler").latents_on_server


def test_two_images_per_prompt_and_eta(sources: dict[str, DiffusionSource], local: Any) -> None:
    source = sources["tiny-random-sdxl"]
    pipe = source.monolithic()
    pipe.scheduler = pipe.scheduler.__class__.from_config(pipe.scheduler.config)
    from lambda_split.diffusion import make_scheduler

    pipe.scheduler = make_scheduler("DDIMScheduler", pipe.scheduler.config)
    kwargs: dict[str, Any] = {"num_images_per_prompt": 2, "eta": 0.7, "output_type": "np"}
    expected = pipe(
        [PROMPT],
        num_inference_steps=3,
        guidance_scale=4.0,
        generator=torch.Generator().manual_seed(9),
        **kwargs,
    ).images
    client = DiffusionClient.from_transport(local("tiny-random-sdxl"), source)
    result = client.generate(
        [PROMPT], steps=3, seed=9, guidance_scale=4.0, scheduler="DDIMScheduler", **kwargs
    )
    assert result.latents_on_server
    np.testing.assert_array_equal(np.stack(result.images), expected)


def test_the_eavesdropper_replays_the_server_loop(sources: dict[str, DiffusionSource], local: Any) -> None:
    """Plain mode: the begin frame and the noise predictions rebuild each step's U-Net input exactly."""
    tap = RecordingTransport(local("tiny-random-sd"))
    client = DiffusionClient.from_transport(tap, sources["tiny-random-sd"])
    seen: list[torch.Tensor] = []
    inner = client.unet.forward

    def spy(sample: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        seen.append(sample.clone())
        return inner(sample, *args, **kwargs)

    client.unet.forward = spy  # type: ignore[method-assign]
    client.generate(PROMPT, steps=4, seed=3, guidance_scale=5.0)
    steps = captured_steps(tap.bodies())
    assert len(steps) == 4
    for step, sample in zip(steps, seen, strict=True):
        assert torch.equal(step.latents, sample[:1])
