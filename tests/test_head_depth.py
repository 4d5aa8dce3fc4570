"""A head depth per session within the range a server allows (lambda_split._head_depth), in process.

One trunk holds layers [1, 6) of tiny-random-llama (split 2:6, head depths 1:4); a session at depth d
must get exactly what the fixed split d:6 gives, alone or batched with sessions of other depths.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

from lambda_split import Checkpoint, GenerationConfig, LocalTransport, SplitClient, SplitSpec, load_parts
from lambda_split._audit import audit
from lambda_split._errors import LimitExceeded
from lambda_split._failover import FailoverPolicy, Reconnector
from lambda_split._generate import encode_prompts
from lambda_split._head_depth import HeadDepths, choose_depth
from lambda_split._llm_trunk import LLMExecutor, load_llm_service
from lambda_split._receipts import ReceiptError, ReceiptSigner
from lambda_split._service import TrunkService
from lambda_split._verify import enable_verification
from lambda_split.protocol import Encoding, FrameKind, decode_frame, encode_frame
from secure_channel import Request, generate_credentials, load_credentials

GREEDY = GenerationConfig(max_new_tokens=6, stop_on_eos=False)
PROMPT = "Tell me about rivers."


@pytest.fixture(scope="module")
def ranged(tiny: Checkpoint) -> tuple[TrunkService, dict[str, Any]]:
    return load_llm_service(tiny, "2:6", security="plain", head_depths="1:4")


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("depth-keys") / "keys"
    generate_credentials(root)
    return root


def fixed(tiny: Checkpoint, depth: int) -> SplitClient:
    service, info = load_llm_service(tiny, f"{depth}:6", security="plain")
    return SplitClient.from_transport(LocalTransport(service, info), tiny)


def open_body(service: TrunkService, info: dict[str, Any], body: dict[str, Any]) -> tuple[int, Any]:
    response = LocalTransport(service, info).exchange(
        Request("POST", "/v1/sessions", json.dumps(body).encode())
    )
    return response.status, response.json()


def test_the_server_advertises_its_range_and_holds_only_those_layers(
    ranged: tuple[TrunkService, dict[str, Any]],
) -> None:
    service, info = ranged
    assert info["split"] == [2, 6] and info["head_depths"] == [1, 4]
    assert (
        len(info["head_depth_fingerprints"]) == 4
        and info["head_depth_fingerprints"][1] == info["fingerprint"]
    )
    trunk = service.executor.trunk  # type: ignore[attr-defined]
    assert (trunk.first, trunk.stop) == (1, 6)


@pytest.mark.parametrize("depth", [0, 5, 6, True, 2.0, "2"])
def test_a_depth_outside_the_range_is_refused_with_400(
    ranged: tuple[TrunkService, dict[str, Any]], depth: Any
) -> None:
    service, info = ranged
    status, body = open_body(service, info, {"wire": "fp32", "head_depth": depth})
    assert status == 400 and body["error"]["code"] == "bad_head_depth", body
    assert service.open_sessions == 0


def test_no_depth_means_the_splits_own(ranged: tuple[TrunkService, dict[str, Any]]) -> None:
    service, info = ranged
    status, body = open_body(service, info, {"wire": "fp32"})
    assert status == 201 and body["head_depth"] == 2
    service.close_session("local", body["session_id"])


def test_a_trunk_without_a_range_takes_only_its_split(tiny: Checkpoint) -> None:
    service, info = load_llm_service(tiny, "2:6", security="plain")
    assert info["head_depths"] == [2, 2]
    assert open_body(service, info, {"head_depth": 3})[1]["error"]["code"] == "bad_head_depth"
    status, body = open_body(service, info, {"head_depth": 2})
    assert status == 201 and body["head_depth"] == 2


@pytest.mark.parametrize("depth", [1, pytest.param(3, marks=pytest.mark.exhaustive), 4])
def test_a_session_at_depth_d_gives_exactly_the_split_d(
    tiny: Checkpoint, ranged: tuple[TrunkService, dict[str, Any]], depth: int
) -> None:
    service, info = ranged
    client = SplitClient.from_transport(LocalTransport(service, info), tiny, head_depth=depth)
    ids, mask = encode_prompts(tiny.tokenizer, [PROMPT], chat=False)
    got = client.generate_ids(ids, mask, GREEDY, keep_logits=True)
    want = fixed(tiny, depth).generate_ids(ids, mask, GREEDY, keep_logits=True)
    assert got.token_ids == want.token_ids
    assert all(torch.equal(a, b) for a, b in zip(got.logits, want.logits, strict=True))
    assert client.last_head_depth == depth
    # The device holds the head of its deepest depth (and of A); ``head`` stays the split's own.
    assert len(client._full_head.layers) == max(depth, 2) and len(client.head.layers) == 2


def test_random_draws_each_depth_of_the_range() -> None:
    import random

    depths = HeadDepths(1, 4)
    assert {choose_depth(depths) for _ in range(200)} == {1, 2, 3, 4}
    assert len({choose_depth(depths, random.Random(5)) for _ in range(3)}) == 1  # a seeded sweep repeats


def test_a_fixed_depth_outside_the_servers_range_is_refused_before_anything_is_sent(
    tiny: Checkpoint, ranged: tuple[TrunkService, dict[str, Any]]
) -> None:
    service, info = ranged
    with pytest.raises(LimitExceeded, match="allows 1:4"):
        SplitClient.from_transport(LocalTransport(service, info), tiny, head_depth=5)


def frame(hidden: torch.Tensor, mask: torch.Tensor) -> Any:
    tensors = {"hidden": (hidden, Encoding.FP32), "mask": (mask.to(torch.uint8), Encoding.U8)}
    return decode_frame(encode_frame(FrameKind.LLM_STEP, bytes(16), 0, tensors))


@torch.inference_mode()
def test_sessions_of_different_depths_batched_together_get_their_solo_outputs(tiny: Checkpoint) -> None:
    spec = SplitSpec(1, 6, 8)
    device = load_parts(tiny, SplitSpec(4, 6, 8), ("head", "tail"))
    trunk = load_parts(tiny, spec, ("trunk",)).trunk
    assert device.head is not None and trunk is not None
    executor = LLMExecutor(trunk, head_depths=HeadDepths(1, 4))
    ids, mask = encode_prompts(tiny.tokenizer, ["The cat sat on the mat", "Hello"], chat=False)
    sessions = []
    for depth, owner in ((1, "a"), (3, "b"), (1, "c"), (4, "d")):
        head = device.head.up_to(depth)
        solo = load_parts(tiny, SplitSpec(depth, 6, 8), ("trunk",)).trunk
        assert solo is not None
        sessions.append((owner, head, head.new_state(), solo, solo.new_state(), executor.new_state(depth)))
    step_ids, step_mask = ids, mask
    for _ in range(3):  # a prefill, then decode steps: every round, all four sessions queue at once
        queued = []
        for owner, head, head_state, solo, solo_state, state in sessions:
            hidden = head(step_ids, step_mask, head_state)  # (B, T, C)
            work = executor.prepare(state, frame(hidden, step_mask), service_limits())
            executor.pools.of(state).hold(state)
            step = executor.scheduler.enqueue(owner, *hidden.shape[:2], work, group=state.start)
            queued.append((step, solo(hidden, step_mask, solo_state), state))
        executor.scheduler.drain()
        for step, want, state in queued:
            executor.pools.of(state).finish(state)
            # (as tests/test_batching.py: a batched forward may differ from a solo one in the last bits)
            assert step.error is None and float((step.result - want).abs().max()) < 1e-5
        step_ids = torch.tensor([[5], [7]])
        step_mask = torch.ones_like(step_ids)
    # Depths 1 (two sessions) share forwards; 3 and 4 run alone: 3 forwards per round.
    assert executor.scheduler.stats.prefill_batches == 3
    assert executor.scheduler.stats.batch_rows == {4: 2, 2: 4}
    # Each depth's pool holds only its own layers' keys and values: a token at depth 4 costs 2 layers.
    per_layer = executor.pools[4].bytes_per_token // 2
    assert executor.pools[1].bytes_per_token == 5 * per_layer
    assert executor.state_bytes(sessions[3][5]) == sessions[3][5].seen * 2 * 2 * per_layer


def service_limits() -> Any:
    from lambda_split import ServiceLimits

    return ServiceLimits()


def signed_client(tiny: Checkpoint, keys: Path, depth: int | str) -> tuple[SplitClient, TrunkService]:
    service, info = load_llm_service(tiny, "2:6", security="plain", head_depths="1:4")
    credentials = load_credentials(keys, "server")
    service.receipts = ReceiptSigner(lambda: credentials, info)
    return SplitClient.from_transport(LocalTransport(service, info), tiny, head_depth=depth), service


def test_receipts_bind_the_depth_and_the_audit_replays_there(
    tiny: Checkpoint, keys: Path, tmp_path: Path
) -> None:
    client, _ = signed_client(tiny, keys, 3)
    path = tmp_path / "t.jsonl"
    verification = enable_verification(client, keys=keys, transcript=path)
    client.generate(PROMPT, GREEDY, chat=False)
    verification.close()
    report = audit(path, "tiny-random-llama", ca_pem=(keys / "ca.pem").read_bytes())
    assert report["verdict"] == "pass" and report["audited_steps"] == 6
    context = report["sessions"][0]["context"]
    assert context["split"] == [3, 6] and context["fingerprint"] == client.info.fingerprint_at(3)
    # The same signatures claimed for depth 2: the chain's start no longer matches them.
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    lines[1]["context"].update(split=[2, 6], fingerprint=client.info.fingerprint)
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    with pytest.raises(ReceiptError, match="does not verify"):
        audit(path, "tiny-random-llama", ca_pem=(keys / "ca.pem").read_bytes())


def test_a_receipt_signed_at_another_depth_is_refused_by_the_client(tiny: Checkpoint, keys: Path) -> None:
    client, service = signed_client(tiny, keys, 3)
    enable_verification(client, keys=keys)
    signer = service.receipts
    service.receipts = type("Liar", (), {"open": lambda _s, raw, wire, _d: signer.open(raw, wire, 2)})()
    with pytest.raises(ReceiptError, match="does not verify"):
        client.generate(PROMPT, GREEDY, chat=False)


class Losing(LocalTransport):
    """Forgets every session of its service after ``after`` steps (a restarted server: 404)."""

    def __init__(self, service: TrunkService, info: dict[str, Any], after: int) -> None:
        super().__init__(service, info)
        self.after = after
        self.steps = 0

    def exchange(self, request: Request) -> Any:
        if request.path.endswith("/step"):
            self.steps += 1
            if self.steps == self.after:
                self.service.close_owners(frozenset({self.owner}))
        return super().exchange(request)


def test_failover_replays_at_the_sessions_depth(tiny: Checkpoint) -> None:
    first, info = load_llm_service(tiny, "2:6", security="plain", head_depths="1:4")
    second, _ = load_llm_service(tiny, "2:6", security="plain", head_depths="1:4")
    opened: list[Any] = []
    original = second.open_session

    def watch(*args: Any, **kwargs: Any) -> Any:
        opened.append(kwargs.get("head_depth"))
        return original(*args, **kwargs)

    second.open_session = watch  # type: ignore[method-assign]
    reconnector = Reconnector(
        ["a", "b"], lambda url: LocalTransport(second, info), FailoverPolicy(attempts=1, backoff_s=0)
    )
    client = SplitClient.from_transport(
        Losing(first, info, after=3), tiny, head_depth=3, reconnector=reconnector, url="a"
    )
    result = client.generate(PROMPT, GREEDY, chat=False)
    assert client.failovers == 1 and opened == [3]
    assert result.token_ids == fixed(tiny, 3).generate(PROMPT, GREEDY, chat=False).token_ids


def test_spot_checks_recompute_each_session_at_its_depth(
    tiny: Checkpoint, keys: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import lambda_split._client

    draws = iter([1, 3, 4])
    monkeypatch.setattr(lambda_split._client, "choose_depth", lambda _depths: next(draws))
    client, _ = signed_client(tiny, keys, "random")
    verification = enable_verification(client, keys=keys, verify_rate=1.0)
    used = []
    for _ in range(3):
        client.generate(PROMPT, GenerationConfig(max_new_tokens=2, stop_on_eos=False), chat=False)
        used.append(client.last_head_depth)
    assert used == [1, 3, 4]
    assert verification.checker is not None and verification.checker.checked == 6
    assert verification.checker.worst < 1e-4


def test_the_frontier_draws_each_sessions_depth_with_the_clients_draw() -> None:
    import random

    from threat_model._frontier_defs import parse_setting

    setting = parse_setting("depth:1-4")
    drawn = [setting.session(2, seed, 64).depth for seed in range(40)]
    assert drawn == [choose_depth(HeadDepths(1, 4), random.Random(seed)) for seed in range(40)]
    assert set(drawn) == {1, 2, 3, 4}
