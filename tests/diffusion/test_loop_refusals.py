"""The latents-on-server frames are bounded and checked: every bad begin or advance is a clear 4xx."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import pytest
import torch
from diffusers import EulerDiscreteScheduler

from lambda_split.diffusion import bytes_tensor
from lambda_split.diffusion._sources import TINY_SCHEDULER_CONFIG
from lambda_split.protocol import Encoding, FrameKind, decode_frame
from tests.diffusion.test_refusals import Session, refused

F32, I8, U8 = Encoding.FP32, Encoding.INT8, Encoding.U8
EULER = EulerDiscreteScheduler.from_config(TINY_SCHEDULER_CONFIG).to_json_string()


def raw(text: str | bytes) -> torch.Tensor:
    data = text.encode() if isinstance(text, str) else text
    return bytes_tensor(data)


def begin_tensors(
    steps: float = 3, side: int = 32, scheduler: str = EULER
) -> dict[str, tuple[torch.Tensor, Encoding]]:
    """A begin frame for tiny-random-sd with classifier-free guidance: two context rows, one noise row."""
    return {
        "encoder_hidden_states": (torch.randn(2, 77, 32), F32),
        "noise": (torch.randn(1, 4, side, side), F32),
        "params": (torch.tensor([float(steps), 5.0, 0.0]), F32),
        "scheduler": (raw(scheduler), U8),
        "generator": (raw(torch.Generator().manual_seed(0).get_state().numpy().tobytes()), U8),
    }


def advance(session: Session, index: float) -> bytes:
    return session.send(FrameKind.DIFFUSION_ADVANCE, {"step": (torch.tensor([float(index)]), F32)})


@pytest.fixture
def session(services: dict[str, Any]) -> Iterator[Session]:
    opened = Session(services["tiny-random-sd"][0])
    yield opened
    opened.service.close_session("alice", opened.sid)


def test_a_good_loop_answers_guided_noise_and_a_digest_then_stops(session: Session) -> None:
    replies = [decode_frame(session.send(FrameKind.DIFFUSION_BEGIN, begin_tensors()))]
    replies += [decode_frame(advance(session, index)) for index in (1, 2)]
    for reply in replies:
        assert tuple(reply.tensors["noise_pred"].shape) == (1, 4, 32, 32)
        digest = reply.tensors["input_digest"]
        assert digest.shape == (1, 64) and digest[0, 0] == 127.0
    refused(lambda: advance(session, 3), 422, "denoising_finished")


def test_calls_per_frame_are_bounded(session: Session) -> None:
    tensors = begin_tensors(steps=10)
    tensors["params"] = (torch.tensor([10.0, 5.0, 0.0, 9.0]), F32)
    refused(lambda: session.send(FrameKind.DIFFUSION_BEGIN, tensors), 413, "step_too_large")
    tensors["params"] = (torch.tensor([10.0, 5.0, 0.0, 8.0]), F32)
    first = decode_frame(session.send(FrameKind.DIFFUSION_BEGIN, tensors))
    assert first.tensors["noise_pred"].shape == (8, 4, 32, 32) and first.tensors["input_digest"].shape == (
        8,
        64,
    )
    refused(
        lambda: session.send(FrameKind.DIFFUSION_ADVANCE, {"step": (torch.tensor([8.0, 3.0]), F32)}),
        422,
        "denoising_finished",
    )
    refused(
        lambda: session.send(FrameKind.DIFFUSION_ADVANCE, {"step": (torch.tensor([8.0, 0.5]), F32)}),
        413,
        "step_too_large",
    )
    last = decode_frame(session.send(FrameKind.DIFFUSION_ADVANCE, {"step": (torch.tensor([8.0, 2.0]), F32)}))
    assert last.tensors["noise_pred"].shape == (2, 4, 32, 32)


def test_advance_before_begin_or_out_of_order_is_refused(session: Session) -> None:
    refused(lambda: advance(session, 1), 409, "missing_begin")
    session.send(FrameKind.DIFFUSION_BEGIN, begin_tensors())
    refused(lambda: advance(session, 2), 409, "bad_step_index")
    refused(lambda: advance(session, 0), 409, "bad_step_index")
    refused(
        lambda: session.send(FrameKind.DIFFUSION_ADVANCE, {"step": (torch.tensor([1.0]), Encoding.FP16)}),
        400,
        "bad_frame",
    )
    advance(session, 1)


def test_more_steps_than_a_session_runs_are_refused_up_front(strict_service: Any) -> None:
    session = Session(strict_service[0])
    tensors = begin_tensors(steps=4)
    tensors["encoder_hidden_states"] = (torch.randn(2, 77, 64), F32)
    tensors |= {"text_embeds": (torch.randn(2, 32), F32), "time_ids": (torch.ones(2, 6), F32)}
    refused(lambda: session.send(FrameKind.DIFFUSION_BEGIN, tensors), 422, "session_step_limit")
    tensors["params"] = (torch.tensor([3.0, 5.0, 0.0]), F32)
    session.send(FrameKind.DIFFUSION_BEGIN, tensors)
    heun = json.loads(EULER) | {"_class_name": "HeunDiscreteScheduler"}
    tensors["scheduler"] = (raw(json.dumps(heun)), U8)  # 3 Heun steps are 5 U-Net calls
    tensors.pop("generator")
    refused(lambda: session.send(FrameKind.DIFFUSION_BEGIN, tensors), 422, "session_step_limit")
    strict_service[0].close_session("alice", session.sid)


def test_oversized_latents_are_refused(session: Session) -> None:
    refused(lambda: session.send(FrameKind.DIFFUSION_BEGIN, begin_tensors(side=96)), 413, "step_too_large")


@pytest.mark.parametrize(
    "change",
    [
        {
            "scheduler": (
                raw(json.dumps(json.loads(EULER) | {"_class_name": "FlowMatchEulerDiscreteScheduler"})),
                U8,
            )
        },
        {"scheduler": (raw(json.dumps(json.loads(EULER) | {"num_train_timesteps": 10**9})), U8)},
        {"scheduler": (raw(json.dumps(json.loads(EULER) | {"beta_schedule": "no-such-schedule"})), U8)},
        {"scheduler": (raw(b"\xff not json"), U8)},
        {"scheduler": (raw(" " * (64 * 1024 + 1)), U8)},
        {"scheduler": (torch.ones(8).to(torch.uint8), U8)},
        {"scheduler": (raw(EULER).float(), F32)},
        {"scheduler": (raw(EULER).float(), Encoding.FP16)},
        {"generator": (raw(b"x" * (16 * 1024 + 1)), U8)},
        {"generator": (raw(b"short"), U8)},
        {"generator": (raw(b"x" * 5056).float(), F32)},
        {"generator": None},
        {"noise": (torch.randn(1, 4, 32, 32), I8)},
        {"noise": (torch.randn(1, 3, 32, 32), F32)},
        {"noise": (torch.randn(3, 4, 32, 32), F32)},
        {"params": (torch.tensor([3.0, 5.0]), F32)},
        {"params": (torch.tensor([2.5, 5.0, 0.0]), F32)},
        {"params": (torch.tensor([3.0, 1e6, 0.0]), F32)},
        {"encoder_hidden_states": None},
        {"extra": (torch.ones(1), F32)},
    ],
    ids=lambda change: "-".join(f"{name}" for name in change),
)
def test_malformed_begin_frames_are_refused(session: Session, change: dict[str, Any]) -> None:
    tensors = begin_tensors()
    for name, value in change.items():
        if value is None:
            tensors.pop(name)
        else:
            tensors[name] = value
    refused(lambda: session.send(FrameKind.DIFFUSION_BEGIN, tensors), 400, "bad_frame")
