from __future__ import annotations

from typing import Any

from lambda_split import (
    Checkpoint,
    LocalTransport,
    ServiceLimits,
    SplitClient,
    SplitSpec,
    TrunkService,
    fingerprint,
    load_parts,
)
from lambda_split._llm_trunk import LLMExecutor
from lambda_split.protocol import PROTOCOL_VERSION


def local_client(
    checkpoint: Checkpoint, split: str, *, wire: str = "fp32", limits: ServiceLimits | None = None
) -> tuple[SplitClient, TrunkService]:
    """A client whose trunk runs in this process, behind the same session protocol as the server."""
    spec = SplitSpec.parse(split, checkpoint.config.num_hidden_layers)
    trunk = load_parts(checkpoint, spec, ("trunk",)).trunk
    service = TrunkService(LLMExecutor(trunk), limits=limits)  # type: ignore[arg-type]
    info: dict[str, Any] = {
        "model": checkpoint.name,
        "fingerprint": fingerprint(checkpoint, (spec.start, spec.stop)),
        "split": [spec.start, spec.stop],
        "num_layers": spec.num_layers,
        "hidden_size": checkpoint.config.hidden_size,
        "security": "plain",
        "protocol_version": PROTOCOL_VERSION,
    }
    return SplitClient.from_transport(LocalTransport(service, info), checkpoint, wire=wire), service


def reference_tokens(
    model: Any, input_ids: Any, mask: Any, new_tokens: int, eos: int | None
) -> list[list[int]]:
    """Greedy tokens of transformers' own generate(), cut after the first EOS like the split loop."""
    out = model.generate(input_ids=input_ids, attention_mask=mask, max_new_tokens=new_tokens, do_sample=False)
    rows = out[:, input_ids.shape[1] :].tolist()
    return [row[: row.index(eos) + 1] if eos in row else row for row in rows]


def run_bench_captured(plan: Any, out: Any, messages: list[str] | None = None) -> tuple[int, list[str]]:
    """``lambda-split bench --json --out OUT`` of ``plan`` in this process, on tiny-random-llama:
    the exit code and the lines it printed; progress messages go to ``messages``."""
    import pytest

    from lambda_split.cli.bench import run_bench

    printed: list[str] = []
    capture = pytest.MonkeyPatch()
    capture.setattr("builtins.print", lambda *args, **_kw: printed.append(" ".join(map(str, args))))
    try:
        code = run_bench(
            out=str(out),
            as_json=True,
            quick=True,
            model="tiny-random-llama",
            progress=(messages if messages is not None else []).append,
            plan=plan,
        )
    finally:
        capture.undo()
    return code, printed


def varint(value: int) -> bytes:
    """LEB128, written here independently of the codec's own encoder (the frame's varints)."""
    out = bytearray()
    while value >= 0x80:
        out.append(value & 0x7F | 0x80)
        value >>= 7
    return bytes(out + bytes((value,)))
