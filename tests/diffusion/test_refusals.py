"""The U-Net service refuses malformed, oversized and out-of-order input; clients refuse a wrong server."""

from __future__ import annotations

import struct
from collections.abc import Iterator
from typing import Any

import pytest
import torch

from lambda_split import FingerprintMismatch, LocalTransport, ProtocolMismatch, ServiceError
from lambda_split.diffusion import DiffusionClient, DiffusionSource, TrunkUNet
from lambda_split.protocol import Encoding, FrameKind, encode_frame

F32, F16, U8 = Encoding.FP32, Encoding.FP16, Encoding.U8


class Session:
    """Drives a service with hand-made frames, one sequence number after another."""

    def __init__(self, service: Any) -> None:
        self.service = service
        self.sid = service.open_session("alice", "fp32")["session_id"]
        self.seq = 0

    def send(self, kind: FrameKind, tensors: dict[str, tuple[torch.Tensor, Encoding]]) -> bytes:
        return self.send_raw(encode_frame(kind, bytes.fromhex(self.sid), self.seq, tensors))

    def send_raw(self, frame: bytes) -> bytes:
        reply = self.service.step("alice", self.sid, frame)
        self.seq += 1
        return reply

    def context(self, batch: int = 2, width: int = 64) -> bytes:
        return self.send(
            FrameKind.DIFFUSION_CONTEXT,
            {
                "encoder_hidden_states": (torch.randn(batch, 77, width), F32),
                "text_embeds": (torch.randn(batch, 32), F32),
                "time_ids": (torch.tensor([[64.0, 64, 0, 0, 64, 64]] * batch), F32),
            },
        )

    def step(
        self, latents: torch.Tensor, encoding: Encoding = F32, t: float = 999.0, t_encoding: Encoding = F32
    ) -> bytes:
        return self.send(
            FrameKind.DIFFUSION_STEP,
            {"latents": (latents, encoding), "timestep": (torch.tensor([t]), t_encoding)},
        )


def refused(call: Any, status: int, code: str) -> None:
    with pytest.raises(ServiceError) as info:
        call()
    assert (info.value.status, info.value.code) == (status, code), info.value.message


@pytest.fixture
def session(services: dict[str, Any]) -> Iterator[Session]:
    """A session on the shared service, closed afterwards so no test leaks one into the next."""
    opened = Session(services["tiny-random-sdxl"][0])
    yield opened
    opened.service.close_session("alice", opened.sid)


def test_a_good_session_answers_noise_of_the_latent_shape(session: Session) -> None:
    from lambda_split.protocol import decode_frame

    session.context()
    reply = decode_frame(session.step(torch.randn(2, 4, 32, 32)))
    assert reply.kind is FrameKind.DIFFUSION_RESULT and tuple(reply.tensors["noise_pred"].shape) == (
        2,
        4,
        32,
        32,
    )


def test_step_without_context_is_refused(session: Session) -> None:
    refused(lambda: session.step(torch.randn(2, 4, 32, 32)), 409, "missing_context")


@pytest.mark.parametrize(
    "latents", [torch.randn(2, 3, 32, 32), torch.randn(1, 4, 32, 32), torch.randn(2, 4, 32)]
)
def test_latents_of_the_wrong_shape_are_refused(session: Session, latents: torch.Tensor) -> None:
    session.context()
    refused(lambda: session.step(latents), 400, "bad_frame")


def test_latents_of_the_wrong_dtype_are_refused(session: Session) -> None:
    session.context()
    refused(lambda: session.step(torch.zeros(2, 4, 32, 32, dtype=torch.uint8), U8), 400, "bad_frame")


def test_a_lossy_timestep_is_refused(session: Session) -> None:
    session.context()
    refused(lambda: session.step(torch.randn(2, 4, 32, 32), t_encoding=F16), 400, "bad_frame")


def test_oversized_latents_are_refused(session: Session) -> None:
    session.context()
    refused(lambda: session.step(torch.randn(2, 4, 96, 32)), 413, "step_too_large")


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_nan_and_inf_latents_are_refused(session: Session, bad: float) -> None:
    session.context()
    frame = bytearray(
        encode_frame(
            FrameKind.DIFFUSION_STEP,
            bytes.fromhex(session.sid),
            session.seq,
            {"latents": (torch.ones(2, 4, 32, 32), F32), "timestep": (torch.ones(1), F32)},
        )
    )
    one = struct.pack("<f", 1.0)
    at = frame.index(one, 64)  # past the header and tensor descriptor: inside the latents payload
    frame[at : at + 4] = struct.pack("<f", bad)
    refused(lambda: session.send_raw(bytes(frame)), 400, "bad_frame")


def test_context_must_match_the_unet(session: Session) -> None:
    refused(lambda: session.context(width=48), 400, "bad_frame")
    refused(
        lambda: session.send(
            FrameKind.DIFFUSION_CONTEXT, {"encoder_hidden_states": (torch.randn(2, 77, 64), F32)}
        ),
        400,
        "bad_frame",
    )
    refused(
        lambda: session.send(
            FrameKind.DIFFUSION_CONTEXT,
            {
                "encoder_hidden_states": (torch.randn(2, 77, 64), F32),
                "text_embeds": (torch.randn(2, 32), F32),
                "time_ids": (torch.randn(2, 5), F32),
            },
        ),
        400,
        "bad_frame",
    )


def test_too_many_steps_are_refused(strict_service: Any) -> None:
    session = Session(strict_service[0])
    session.context()
    for _ in range(3):
        session.step(torch.randn(2, 4, 16, 16))
    refused(lambda: session.step(torch.randn(2, 4, 16, 16)), 422, "session_step_limit")


def test_an_llm_frame_is_refused(session: Session) -> None:
    refused(
        lambda: session.send(FrameKind.LLM_STEP, {"hidden": (torch.randn(1, 2, 64), F32)}), 400, "bad_frame"
    )


def test_client_refuses_a_server_with_another_unet(
    services: dict[str, Any], sources: dict[str, DiffusionSource]
) -> None:
    service, info = services["tiny-random-sd"]
    with pytest.raises(FingerprintMismatch):
        DiffusionClient.from_transport(LocalTransport(service, info), sources["tiny-random-sdxl"])
    forged = info | {"fingerprint": "sha256:" + "0" * 64}
    with pytest.raises(FingerprintMismatch):
        DiffusionClient.from_transport(LocalTransport(service, forged), sources["tiny-random-sd"])
    llm = info | {"kind": "llm"}
    with pytest.raises(ProtocolMismatch):
        DiffusionClient.from_transport(LocalTransport(service, llm), sources["tiny-random-sd"])


def test_the_stand_in_unet_refuses_conditioning_it_cannot_carry(sources: dict[str, DiffusionSource]) -> None:
    unet = TrunkUNet(sources["tiny-random-sd"].unet_config, lambda latents, t, context: latents)
    with pytest.raises(NotImplementedError):
        unet(torch.randn(1, 4, 8, 8), 10, torch.randn(1, 77, 32), timestep_cond=torch.randn(1, 4))
    with pytest.raises(NotImplementedError):
        unet(
            torch.randn(1, 4, 8, 8),
            10,
            torch.randn(1, 77, 32),
            added_cond_kwargs={"image_embeds": torch.ones(1)},
        )
