"""The benchmark's pieces on tiny-random-llama: structure and sanity of the figures, never a timing threshold."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from lambda_split.cli.bench import Plan, run_bench
from lambda_split.cli.bench._stats import ratios, rotated, summarize
from secure_channel import SECURITY_MODES

TINY = "tiny-random-llama"
ENCODINGS = ("fp32", "fp16", "bf16", "int8")
TINY_PLAN = Plan(model=TINY, decode_model=TINY, decode_tokens=4, decode_reps=2, hf_generate=True,
                 ttft_model=TINY, ttft_lengths=(8, 32), ttft_reps=1, cache_runs=((TINY, (8, 16)),), cache_reps=1,
                 wire_model=TINY, wire_tokens=4, concurrency_model=TINY, concurrency_clients=(1, 2),
                 concurrency_tokens=3, concurrency_reps=1, security_reps=2, part_steps=2,
                 diffusion_model=None)  # fmt: skip


@pytest.fixture(scope="module")
def bench_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[str, Any], Path, list[str]]:
    out = tmp_path_factory.mktemp("bench")
    messages: list[str] = []
    capture = pytest.MonkeyPatch()
    printed: list[str] = []
    capture.setattr("builtins.print", lambda *args, **_kw: printed.append(" ".join(map(str, args))))
    try:
        code = run_bench(
            out=str(out), as_json=True, quick=True, model=TINY, progress=messages.append, plan=TINY_PLAN
        )
    finally:
        capture.undo()
    assert code == 0, messages
    assert len(printed) == 1, "--json prints exactly one JSON object"
    return json.loads(printed[0]), out, messages


def test_every_section_is_present_and_nothing_failed(
    bench_run: tuple[dict[str, Any], Path, list[str]],
) -> None:
    results, _, messages = bench_run
    assert results["failed_sections"] == []
    for name in ("meta", "decode", "time_to_first_token", "kv_cache_vs_recompute", "wire", "concurrency",
                 "security", "part_times", "network_model", "diffusion"):  # fmt: skip
        assert name in results
    assert results["diffusion"]["status"] == "not measured"
    assert results["meta"]["cores"] >= 1 and results["meta"]["torch"]
    assert messages, "progress is reported while the benchmark runs"


def test_decode_and_latency_figures_are_positive_ratios(
    bench_run: tuple[dict[str, Any], Path, list[str]],
) -> None:
    results, _, _ = bench_run
    decode = results["decode"]
    assert set(decode["tokens_per_s"]) == {"monolithic", "hf_generate", *SECURITY_MODES}
    for name, ratio in decode["ratio_vs_monolithic"].items():
        assert ratio["n"] == 2 and ratio["median"] > 0, name
        assert ratio["min"] <= ratio["q1"] <= ratio["median"] <= ratio["q3"] <= ratio["max"]
    assert isinstance(decode["goal"]["met"], bool)
    for entry in results["time_to_first_token"]["by_prompt_tokens"].values():
        assert all(s["median"] > 0 for s in entry["ttft_s"].values())
    for entry in results["kv_cache_vs_recompute"]["runs"][0]["by_generated_tokens"].values():
        assert entry["speedup_cache_over_recompute"]["median"] > 0
        assert entry["same_tokens"], "the recompute baseline decodes the same greedy tokens"
    for entry in results["concurrency"]["by_clients"].values():
        assert entry["aggregate_tokens_per_s"]["median"] > 0
        assert 0 < entry["token_latency_ms"]["p50"] <= entry["token_latency_ms"]["p99"]


def test_wire_bytes_exceed_the_payload_in_every_mode(
    bench_run: tuple[dict[str, Any], Path, list[str]],
) -> None:
    results, _, _ = bench_run
    wire = results["wire"]
    d = wire["hidden_size"]
    assert wire["ideal_fp16_bytes_per_direction"] == 2 * d
    assert wire["payload_bytes_per_direction"] == {"fp32": 4 * d, "fp16": 2 * d, "bf16": 2 * d,
                                                   "int8": d + 4 * d // 64}  # fmt: skip
    for mode in SECURITY_MODES:
        steps = {e: wire["by_mode"][mode][e]["decode_step_bytes"] for e in ENCODINGS}
        for direction in ("sent", "received"):
            assert steps["fp32"][direction] > 4 * d
            assert steps["fp32"][direction] > steps["fp16"][direction] > steps["int8"][direction]
    plain, both = wire["by_mode"]["plain"]["fp32"], wire["by_mode"]["tls+aesgcm"]["fp32"]
    assert both["decode_step_bytes"]["total"] > plain["decode_step_bytes"]["total"]
    for enc in ENCODINGS[1:]:
        accuracy = wire["accuracy_vs_fp32"][enc]
        assert 0 <= accuracy["prefix_agreement"] <= 1 and accuracy["max_abs_logit_error"] >= 0
        assert accuracy["bytes_saved_vs_fp32"] > 0
    overhead = results["security"]["wire_overhead_bytes"]
    assert overhead["sent"]["tls"] > 0 and overhead["sent"]["aesgcm"] > 0


def test_security_costs_and_network_model(bench_run: tuple[dict[str, Any], Path, list[str]]) -> None:
    results, _, _ = bench_run
    security = results["security"]
    assert set(security["connection_setup"]) == set(SECURITY_MODES)
    assert security["aesgcm_handshake"]["aesgcm"]["bytes"] > 0
    for frame in security["aead_us_per_frame"].values():
        assert frame["record_bytes"] > frame["frame_bytes"] and frame["seal"]["median"] > 0
    model = results["network_model"]
    assert set(model["models"]) == {TINY, "Llama-2-7B", "Llama-2-70B"} and model["assumptions"]
    for entry in model["models"].values():
        for link in entry["links"].values():
            for device in link.values():
                assert all(v["tokens_per_s"] > 0 for v in device.values())
                assert device["fp32"]["bytes_up"] > device["int8"]["bytes_up"]


def test_outputs_are_written(bench_run: tuple[dict[str, Any], Path, list[str]]) -> None:
    results, out, _ = bench_run
    assert json.loads((out / "results.json").read_text()) == results
    assert (out / "results.md").read_text().startswith("# Λ-Split benchmark")
    for name in (
        "tokens_per_s_by_mode",
        "bytes_per_token_by_encoding",
        "concurrency_scaling",
        "cache_vs_recompute",
    ):
        assert (out / f"{name}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_stats_helpers() -> None:
    assert summarize([3.0, 1.0, 2.0])["median"] == 2.0
    assert summarize([])["n"] == 0
    assert ratios([2.0, 6.0], [1.0, 3.0]) == [2.0, 2.0]
    assert rotated(["a", "b", "c"], 1) == ["b", "c", "a"]
