"""Cross-session batching in the trunk gives every session exactly what it gets alone.

Sessions of different lengths (one of two left-padded rows) step in lockstep through the real
scheduler and slot pool; each is checked against its solo run through the per-session
``DynamicCache`` trunk. Batches are formed with ``enqueue`` + ``drain``, so their composition is
deterministic, not a matter of thread timing.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch

from lambda_split import Checkpoint, GenerationConfig, ServiceError, ServiceLimits, SplitSpec, load_parts
from lambda_split._generate import encode_prompts, generate_tokens
from lambda_split._llm_trunk import LLMExecutor
from lambda_split._parts import Head, Tail, Trunk
from lambda_split._scheduler import Step
from lambda_split._service import TrunkService
from lambda_split.protocol import Encoding, FrameKind, decode_frame, encode_frame

SESSIONS = [
    ["Hi"],
    ["What is the capital of France?", "Hi there"],  # two rows: the second is left-padded
    ["Tell me a long story about a dragon and a brave knight."],
    ["One two three four five six seven eight"],
]
LIMITS = ServiceLimits()
NEW_TOKENS = 12


@pytest.fixture(scope="module")
def parts(tiny: Checkpoint) -> tuple[Head, Trunk, Tail]:
    spec = SplitSpec.parse("2:-2", 8)
    device, server = load_parts(tiny, spec, ("head", "tail")), load_parts(tiny, spec, ("trunk",))
    assert device.head and device.tail and server.trunk
    return device.head, server.trunk, device.tail


def frame_for(hidden: torch.Tensor, mask: torch.Tensor) -> Any:
    tensors = {"hidden": (hidden, Encoding.FP32), "mask": (mask.to(torch.uint8), Encoding.U8)}
    return decode_frame(encode_frame(FrameKind.LLM_STEP, bytes(16), 0, tensors))


class Device:
    """One client: its own head and tail, a batched trunk session, and a solo trunk for comparison."""

    def __init__(self, parts: tuple[Head, Trunk, Tail], executor: LLMExecutor, ids: Any, mask: Any) -> None:
        self.head, self.trunk, self.tail = parts
        self.executor = executor
        self.head_state, self.tail_state, self.solo = (p.new_state() for p in parts)
        self.state = executor.new_state()
        self.ids, self.mask = ids, mask
        self.tokens: list[list[int]] = [[] for _ in range(ids.shape[0])]
        self.hidden = torch.empty(0)

    def enqueue(self, owner: str) -> Step:
        self.hidden = self.head(self.ids, self.mask, self.head_state)  # (B, T, C)
        work = self.executor.prepare(self.state, frame_for(self.hidden, self.mask), LIMITS)
        self.executor.pool.hold(self.state)
        return self.executor.scheduler.enqueue(owner, *self.hidden.shape[:2], work)

    def take(self, step: Step) -> float:
        """Finish a step with the batched output; return its largest difference from the solo trunk."""
        self.executor.pool.finish(self.state)
        if step.error is not None:
            raise step.error
        out = step.result  # (B, T, C)
        solo = self.trunk(self.hidden, self.mask, self.solo)
        logits = self.tail(out, self.mask, self.tail_state)[:, -1, :]  # (B, V)
        next_ids = logits.argmax(-1)
        for row, token in enumerate(next_ids.tolist()):
            self.tokens[row].append(token)
        self.ids, self.mask = next_ids[:, None], torch.ones_like(next_ids[:, None])
        return float((out - solo).abs().max())


def solo_tokens(parts: tuple[Head, Trunk, Tail], tokenizer: Any, ids: Any, mask: Any) -> list[list[int]]:
    head, trunk, tail = parts
    state = trunk.new_state()
    config = GenerationConfig(max_new_tokens=NEW_TOKENS, stop_on_eos=False)
    return generate_tokens(
        head, lambda h, m: trunk(h, m, state), tail, tokenizer, ids, mask, config
    ).token_ids


@torch.inference_mode()
def test_concurrent_sessions_get_their_solo_tokens_and_hidden_states(
    tiny: Checkpoint, parts: tuple[Head, Trunk, Tail]
) -> None:
    executor = LLMExecutor(parts[1])
    tokenizer = tiny.tokenizer
    inputs = [encode_prompts(tokenizer, prompts, chat=False) for prompts in SESSIONS]
    devices = [Device(parts, executor, ids, mask) for ids, mask in inputs]
    largest = 0.0
    # Session k joins at round k, so prefills arrive while others decode (continuous batching).
    for round_ in range(NEW_TOKENS + len(devices) - 1):
        active = [d for k, d in enumerate(devices) if k <= round_ < k + NEW_TOKENS]
        steps = [d.enqueue(f"owner{k % 2}") for k, d in enumerate(active)]
        executor.scheduler.drain()
        largest = max([largest, *(d.take(s) for d, s in zip(active, steps, strict=True))])
    print(f"largest |batched - solo| hidden difference: {largest:.3g}")
    assert largest < 1e-5
    for device, (ids, mask) in zip(devices, inputs, strict=True):
        assert device.tokens == solo_tokens(parts, tokenizer, ids, mask)
    # Decode batches really held every decoding session's rows (1 + 2 + 1 + 1).
    assert 5 in executor.scheduler.stats.batch_rows
    assert executor.scheduler.stats.prefills == len(devices)
    assert executor.pool.used == sum(d.state.seen * (d.state.rows or 0) for d in devices)


@torch.inference_mode()
def test_prefills_of_one_length_share_a_forward_and_each_session_gets_its_solo_tokens(
    tiny: Checkpoint, parts: tuple[Head, Trunk, Tail]
) -> None:
    executor = LLMExecutor(parts[1])
    tokenizer = tiny.tokenizer
    # Three sessions (one of two rows), different prompts padded to one length, as prompt_bucket does.
    prompts = [["The cat sat on the mat"], ["Green ideas sleep", "Hello there, friend"], ["Zebra"]]
    inputs = [encode_prompts(tokenizer, p, chat=False, pad_to_multiple_of=32) for p in prompts]
    assert len({ids.shape[1] for ids, _ in inputs}) == 1
    devices = [Device(parts, executor, ids, mask) for ids, mask in inputs]
    largest = 0.0
    for _ in range(NEW_TOKENS):
        steps = [d.enqueue(f"owner{k}") for k, d in enumerate(devices)]
        executor.scheduler.drain()
        largest = max([largest, *(d.take(s) for d, s in zip(devices, steps, strict=True))])
    assert largest < 1e-5
    for device, (ids, mask) in zip(devices, inputs, strict=True):
        assert device.tokens == solo_tokens(parts, tokenizer, ids, mask)
    stats = executor.scheduler.stats
    assert stats.prefills == 3 and stats.prefill_batches == 1  # all three prompts in one forward
    assert stats.batch_rows == {4: NEW_TOKENS - 1}


@torch.inference_mode()
def test_a_session_closed_mid_batch_or_over_its_limit_leaves_the_other_rows_alone(
    tiny: Checkpoint, parts: tuple[Head, Trunk, Tail]
) -> None:
    executor = LLMExecutor(parts[1])
    tokenizer = tiny.tokenizer
    devices = [Device(parts, executor, *encode_prompts(tokenizer, p, chat=False)) for p in SESSIONS[:3]]
    for device in devices:  # prefills
        step = device.enqueue("a")
        executor.scheduler.drain()
        device.take(step)
    keep, closing, limited = devices
    steps = [keep.enqueue("a"), closing.enqueue("b")]
    held = executor.pool.used
    executor.release(closing.state)  # closed while its step is queued: its slots stay until it ends
    assert executor.pool.used == held and closing.state.seen > 0
    with pytest.raises(ServiceError) as over:  # a step that would pass the session's token limit
        executor.prepare(
            limited.state,
            frame_for(torch.zeros(1, 5, 64), torch.ones(1, 5)),
            ServiceLimits(max_tokens_per_session=limited.state.seen + 4),
        )
    assert over.value.code == "session_token_limit"
    executor.scheduler.drain()
    assert keep.take(steps[0]) < 1e-5
    with pytest.raises(ServiceError) as gone:
        closing.take(steps[1])
    assert gone.value.code == "session_not_found"
    assert executor.pool.used == sum(d.state.seen * (d.state.rows or 0) for d in (keep, limited))
    assert closing.state.seen == 0
    # The freed slots are reused by the next steps, and the survivors still match their solo runs.
    capacity = executor.pool.capacity
    for _ in range(3):
        steps = [keep.enqueue("a"), limited.enqueue("c")]
        executor.scheduler.drain()
        assert max(keep.take(steps[0]), limited.take(steps[1])) < 1e-5
    assert executor.pool.capacity == capacity


def test_eviction_and_expiry_free_slots_without_touching_other_sessions(
    tiny: Checkpoint, parts: tuple[Head, Trunk, Tail]
) -> None:
    per_token = 4 * 2 * 2 * 16 * 4  # layers x (k, v) x kv heads x head dim x fp32
    service = TrunkService(LLMExecutor(parts[1]), limits=ServiceLimits(max_cache_bytes=per_token * 30))
    executor = service.executor
    assert isinstance(executor, LLMExecutor)
    trunk = parts[1]
    torch.manual_seed(0)
    inputs = {"old": torch.randn(1, 20, 64), "kept": torch.randn(1, 8, 64), "new": torch.randn(1, 9, 64)}
    sids = {name: service.open_session(name, "fp32")["session_id"] for name in inputs}
    solo = {name: trunk.new_state() for name in inputs}

    def step(name: str, seq: int, hidden: torch.Tensor) -> float:
        sid = sids[name]
        tensors = {
            "hidden": (hidden, Encoding.FP32),
            "mask": (torch.ones(1, hidden.shape[1], dtype=torch.uint8), Encoding.U8),
        }
        body = encode_frame(FrameKind.LLM_STEP, bytes.fromhex(sid), seq, tensors)
        out = decode_frame(service.step(name, sid, body)).tensors["hidden"]
        with torch.inference_mode():
            expected = trunk(hidden, torch.ones(1, hidden.shape[1], dtype=torch.long), solo[name])
        return float((out - expected).abs().max())

    assert step("old", 0, inputs["old"]) < 1e-5
    assert step("kept", 0, inputs["kept"]) < 1e-5
    assert step("new", 0, inputs["new"]) < 1e-5  # 37 tokens > 30: the least recently used goes
    assert service.evicted == 1 and executor.pool.used == 17
    stats = service.batching
    assert stats is not None and stats["slots_used"] == 17 and stats["slot_bytes_used"] == 17 * per_token
    for seq in range(1, 4):
        assert step("kept", seq, torch.randn(1, 1, 64)) < 1e-5
        assert step("new", seq, torch.randn(1, 1, 64)) < 1e-5
    assert executor.pool.used == 23 and executor.pool.capacity == 64  # slots of "old" were reused
    service.close_session("new", sids["new"])
    assert executor.pool.used == 11


def test_metrics_show_batch_sizes_queue_time_and_slot_occupancy(parts: tuple[Head, Trunk, Tail]) -> None:
    from prometheus_client import generate_latest

    from server.observability import Metrics

    executor = LLMExecutor(parts[1])
    service = TrunkService(executor)
    metrics = Metrics()
    metrics.watch(service)
    states = [executor.new_state() for _ in range(3)]
    for state in states:
        executor.step(state, frame_for(torch.randn(1, 4, 64), torch.ones(1, 4)), LIMITS)
    with torch.inference_mode():
        steps = [
            executor.scheduler.enqueue(
                "a", 1, 1, executor.prepare(s, frame_for(torch.randn(1, 1, 64), torch.ones(1, 1)), LIMITS)
            )
            for s in states
        ]
        executor.scheduler.drain()
    assert all(s.error is None for s in steps)
    text = generate_latest(metrics.registry).decode()
    for line in (
        'lambda_split_batch_rows_bucket{le="2"} 0.0',
        'lambda_split_batch_rows_bucket{le="4"} 1.0',
        "lambda_split_batch_rows_sum 3.0",
        "lambda_split_prefills_total 3.0",
        "lambda_split_prefill_batches_total 3.0",
        "lambda_split_kv_slots_used 15.0",
        "lambda_split_steps_queued 0.0",
    ):
        assert line in text, line
    assert "lambda_split_step_queue_seconds_total" in text and "lambda_split_kv_slot_bytes_total" in text


def test_a_step_queued_past_its_deadline_is_refused_with_503_and_retry_after(
    parts: tuple[Head, Trunk, Tail],
) -> None:
    readings = iter([0.0, 31.0])  # queued at 0 s, looked at by the runner at 31 s

    executor = LLMExecutor(parts[1], clock=lambda: next(readings))
    state = executor.new_state()
    with pytest.raises(ServiceError) as late:
        executor.step_as("a", state, frame_for(torch.randn(1, 1, 64), torch.ones(1, 1)), LIMITS)
    assert (late.value.status, late.value.code, late.value.retry_after) == (503, "step_timeout", 1)
    assert state.seen == 0 and executor.pool.used == 0 and state.in_flight == 0
