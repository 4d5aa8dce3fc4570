"""Trunk sessions: ownership, ordering, limits, expiry and memory bounds."""

from __future__ import annotations

import pytest
import torch

from lambda_split import Checkpoint, ServiceError, ServiceLimits, SplitSpec, TrunkService, load_parts
from lambda_split._llm_trunk import LLMExecutor
from lambda_split.protocol import Encoding, FrameKind, decode_frame, encode_frame


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock()


def make_service(tiny: Checkpoint, clock: Clock, **limits: int | float) -> TrunkService:
    trunk = load_parts(tiny, SplitSpec.parse("2:-2", 8), ("trunk",)).trunk
    return TrunkService(LLMExecutor(trunk), limits=ServiceLimits(**limits), clock=clock)  # type: ignore[arg-type]


def step_body(session_id: str, seq: int, tokens: int = 3, batch: int = 1, width: int = 64) -> bytes:
    tensors = {
        "hidden": (torch.randn(batch, tokens, width), Encoding.FP32),
        "mask": (torch.ones(batch, tokens, dtype=torch.uint8), Encoding.U8),
    }
    return encode_frame(FrameKind.LLM_STEP, bytes.fromhex(session_id), seq, tensors)


def refused(code: str, call: object, *args: object) -> ServiceError:
    with pytest.raises(ServiceError) as info:
        call(*args)  # type: ignore[operator]
    assert info.value.code == code
    return info.value


def test_a_step_returns_hidden_states_of_the_same_shape(tiny: Checkpoint, clock: Clock) -> None:
    service = make_service(tiny, clock)
    sid = service.open_session("alice", "fp16")["session_id"]
    reply = decode_frame(service.step("alice", sid, step_body(sid, 0)))
    assert reply.kind is FrameKind.LLM_RESULT and reply.seq == 0
    assert reply.tensors["hidden"].shape == (1, 3, 64) and reply.encodings["hidden"] is Encoding.FP16


def test_another_client_cannot_step_or_close_a_session(tiny: Checkpoint, clock: Clock) -> None:
    service = make_service(tiny, clock)
    sid = service.open_session("alice", "fp32")["session_id"]
    refused("session_not_found", service.step, "mallory", sid, step_body(sid, 0))
    refused("session_not_found", service.close_session, "mallory", sid)
    service.step("alice", sid, step_body(sid, 0))  # alice's session is untouched


def test_guessed_and_malformed_session_ids_look_the_same(tiny: Checkpoint, clock: Clock) -> None:
    service = make_service(tiny, clock)
    for guess in ("00" * 16, "zz", "", "ab" * 40):
        refused("session_not_found", service.step, "alice", guess, b"")


def test_sequence_numbers_must_advance(tiny: Checkpoint, clock: Clock) -> None:
    service = make_service(tiny, clock)
    sid = service.open_session("alice", "fp32")["session_id"]
    body = step_body(sid, 0)
    service.step("alice", sid, body)
    refused("bad_sequence", service.step, "alice", sid, body)  # a replayed step
    service.step("alice", sid, step_body(sid, 1, tokens=1))


def test_answered_steps_are_timed_and_refused_ones_are_not(tiny: Checkpoint, clock: Clock) -> None:
    from lambda_split._service import STEP_TIME_BOUNDS

    service = make_service(tiny, clock)
    sid = service.open_session("alice", "fp32")["session_id"]
    service.step("alice", sid, step_body(sid, 0))
    service.step("alice", sid, step_body(sid, 1, tokens=1))
    refused("bad_sequence", service.step, "alice", sid, step_body(sid, 0))
    refused("bad_frame", service.step, "alice", sid, b"garbage")
    refused("session_not_found", service.step, "mallory", sid, step_body(sid, 2))
    service.step("alice", sid, step_body(sid, 2, tokens=1))
    prefill, decode = service.step_times["prefill"], service.step_times["decode"]
    assert (prefill.count, decode.count, service.step_times["denoise"].count) == (1, 2, 0)
    assert (
        0 < prefill.total + decode.total < 60
    )  # wall time of three steps of a tiny model, not the fake clock's
    decode.record(STEP_TIME_BOUNDS[-1] + 1)  # past the last bound: counted, in no bucket
    assert decode.count == 3 and sum(decode.counts) <= 2


def test_bad_frames_wrong_width_and_batch_change(tiny: Checkpoint, clock: Clock) -> None:
    service = make_service(tiny, clock)
    sid = service.open_session("alice", "fp32")["session_id"]
    refused("bad_frame", service.step, "alice", sid, b"garbage")
    refused("bad_frame", service.step, "alice", sid, step_body(sid, 0, width=65))
    service.step("alice", sid, step_body(sid, 0, batch=2))
    refused("bad_frame", service.step, "alice", sid, step_body(sid, 1, batch=3))
    other = service.open_session("alice", "fp32")["session_id"]
    refused("bad_frame", service.step, "alice", sid, step_body(other, 1, batch=2))


def test_limits_on_sessions_tokens_and_step_size(tiny: Checkpoint, clock: Clock) -> None:
    service = make_service(tiny, clock, max_sessions=2, max_tokens_per_session=5, max_batch=2)
    sid = service.open_session("a", "fp32")["session_id"]
    service.open_session("b", "fp32")
    assert refused("too_many_sessions", service.open_session, "c", "fp32").retry_after
    refused("step_too_large", service.step, "a", sid, step_body(sid, 0, batch=3))
    service.step("a", sid, step_body(sid, 0, tokens=4))
    refused("session_token_limit", service.step, "a", sid, step_body(sid, 1, tokens=2))
    refused("bad_wire_encoding", service.open_session, "a", "fp64")


def test_idle_sessions_expire(tiny: Checkpoint, clock: Clock) -> None:
    service = make_service(tiny, clock, idle_timeout_s=10)
    sid = service.open_session("a", "fp32")["session_id"]
    clock.now = 9
    service.step("a", sid, step_body(sid, 0))
    clock.now = 18
    assert service.expire_idle() == 0
    clock.now = 20
    assert service.expire_idle() == 1 and service.open_sessions == 0
    refused("session_not_found", service.step, "a", sid, step_body(sid, 1))


def test_kv_cache_memory_is_capped_by_evicting_the_least_recently_used(
    tiny: Checkpoint, clock: Clock
) -> None:
    per_token = 4 * 2 * 2 * 16 * 4  # layers x (k, v) x kv heads x head dim x fp32
    service = make_service(tiny, clock, max_cache_bytes=per_token * 25)
    old = service.open_session("a", "fp32")["session_id"]
    new = service.open_session("b", "fp32")["session_id"]
    service.step("a", old, step_body(old, 0, tokens=20))
    assert service.cache_bytes == per_token * 20
    service.step("b", new, step_body(new, 0, tokens=10))
    assert service.cache_bytes <= per_token * 25 and service.evicted == 1
    refused("session_not_found", service.step, "a", old, step_body(old, 1, tokens=1))


def test_info_advertises_the_limits_a_client_checks_before_uploading(tiny: Checkpoint) -> None:
    from lambda_split import load_llm_service
    from lambda_split._codec import FrameLimits

    limits = ServiceLimits(
        max_step_tokens=7, max_tokens_per_session=11, max_sessions=3, frame=FrameLimits(max_bytes=4096)
    )
    _, info = load_llm_service(tiny, "2:-2", security="plain", limits=limits)
    assert info["limits"] == {
        "max_batch": 8,
        "max_step_tokens": 7,
        "max_tokens_per_session": 11,
        "max_frame_bytes": 4096,
        "max_sessions": 3,
        "idle_timeout_s": 300.0,
    }


def test_step_refusals_state_the_advertised_limit(tiny: Checkpoint, clock: Clock) -> None:
    from lambda_split._codec import FrameLimits

    service = make_service(tiny, clock, max_step_tokens=4)
    sid = service.open_session("a", "fp32")["session_id"]
    too_long = refused("step_too_large", service.step, "a", sid, step_body(sid, 0, tokens=5))
    assert (
        too_long.status == 413
        and "at most 4 tokens" in too_long.message
        and "got 5 tokens" in too_long.message
    )
    small = TrunkService(
        service.executor, limits=ServiceLimits(frame=FrameLimits(max_bytes=1024)), clock=clock
    )
    sid = small.open_session("a", "fp32")["session_id"]
    too_big = refused("frame_too_large", small.step, "a", sid, step_body(sid, 0, tokens=5))
    assert too_big.status == 413 and "1,024 bytes" in too_big.message
