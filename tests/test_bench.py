"""The benchmark on tiny-random-llama: structure and sanity of the figures, never a timing threshold.

The deployment benchmark (server and clients in processes of their own) first, then the older
in-process suite (``--in-process``).
"""

from __future__ import annotations

import argparse
import json
import math
import os
from pathlib import Path
from typing import Any

import pytest

from lambda_split.cli.bench import DeployPlan, Plan, _deploy_report, add_arguments, deploy_plan
from lambda_split.cli.bench._deploy import _link_time, _steadiness, goals
from lambda_split.cli.bench._stats import ratios, rotated, steadiness, summarize
from secure_channel import SECURITY_MODES
from tests.helpers import run_bench_captured, varint

TINY = "tiny-random-llama"
ENCODINGS = ("fp32", "fp16", "bf16", "int8")
TINY_PLAN = Plan(model=TINY, decode_model=TINY, decode_tokens=4, decode_reps=2, hf_generate=True,
                 ttft_model=TINY, ttft_lengths=(8, 32), ttft_reps=1, cache_runs=((TINY, (8, 16)),), cache_reps=1,
                 wire_model=TINY, wire_tokens=4, concurrency_model=TINY, concurrency_clients=(1, 2),
                 concurrency_tokens=3, concurrency_reps=1, security_reps=2, part_steps=2,
                 diffusion_model=None)  # fmt: skip


DEPLOY_PLAN = DeployPlan(model=TINY, modes=("tls+aesgcm",), transports=("stream", "http"), wire="fp32",
                         wires=("fp16", "int8"), tokens=4, reps=2, byte_tokens=3, clients=(1, 2),
                         concurrency_modes=("tls+aesgcm",), concurrency_tokens=3, concurrency_reps=1,
                         sections=("decode", "wire", "concurrency", "link"), link_rtts_ms=(30.0,))  # fmt: skip


def _run(plan: Any, out: Path, messages: list[str]) -> tuple[int, list[str]]:
    return run_bench_captured(plan, out, messages)


@pytest.fixture(scope="module")
def deploy_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[str, Any], Path, list[str]]:
    out = tmp_path_factory.mktemp("deploy")
    messages: list[str] = []
    code, printed = _run(DEPLOY_PLAN, out, messages)
    assert code == 0, messages
    assert len(printed) == 1, "--json prints exactly one JSON object"
    return json.loads(printed[0]), out, messages


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return Path(f"/proc/{pid}/status").exists() and "zombie" not in Path(f"/proc/{pid}/status").read_text()


@pytest.mark.heavy
def test_deploy_server_and_clients_ran_in_processes_of_their_own(
    deploy_run: tuple[dict[str, Any], Path, list[str]],
) -> None:
    results, _, messages = deploy_run
    assert results["failed_sections"] == [] and results["meta"]["kind"] == "deployment"
    procs = results["processes"]
    server = procs["servers"]["tls+aesgcm"]
    clients = procs["clients"]["tls+aesgcm"]
    assert procs["bench_pid"] == os.getpid()
    assert server != os.getpid() and len(set(clients)) == 2 and not {server, os.getpid()} & set(clients)
    assert procs["server_exit_codes"] == {"tls+aesgcm": 0}, "SIGTERM shuts the server down with 0"
    assert not _alive(server) and not any(_alive(pid) for pid in clients), "no process is left running"
    assert any("listening on" in m for m in messages), "progress lines while it runs"


@pytest.mark.heavy
def test_deploy_figures_are_finite_positive_and_tokens_match(
    deploy_run: tuple[dict[str, Any], Path, list[str]],
) -> None:
    results, _, _ = deploy_run
    decode = results["decode"]
    assert set(decode["by_variant"]) == {"tls+aesgcm/stream", "tls+aesgcm/http"}
    assert decode["generate"]["decode_tokens_per_s"]["median"] > 0
    steady = decode["steadiness"]
    assert steady["cv"] >= 0 and isinstance(steady["steady"], bool)
    assert set(steady["by_variant"]) == {"generate()", "tls+aesgcm/stream", "tls+aesgcm/http"}
    assert isinstance(results["link"]["steadiness"]["steady"], bool)
    for entry in decode["by_variant"].values():
        ratio = entry["ratio_vs_generate"]
        assert ratio["n"] == 2 and 0 < ratio["min"] <= ratio["median"] <= ratio["max"]
        assert math.isfinite(entry["added_ms_per_token"]["median"])
        assert entry["ttft_ms"]["median"] > 0 and entry["decode_tokens_per_s"]["median"] > 0
        assert 0 <= entry["tokens_equal_generate"] <= 2
        # the server's /metrics counted exactly the run's steps in every repetition
        assert entry["server_ms_per_step"]["n"] == entry["link_ms_per_step"]["n"] == 2
        assert entry["server_ms_per_step"]["min"] > 0 and entry["link_ms_per_step"]["min"] > 0
    wire = results["wire"]
    for entry in wire["by_variant"].values():
        for enc in ("fp16", "int8"):
            assert entry[enc]["sent"] > wire["payload_bytes_per_direction"][enc]
            assert entry[enc]["received"] > wire["payload_bytes_per_direction"][enc]
        assert 0 < entry["int8_over_fp16"] < 1
    stream, http = (wire["by_variant"][f"tls+aesgcm/{k}"]["fp16"]["total"] for k in ("stream", "http"))
    assert stream < http, "the stream carries no HTTP request per token"
    for variant in ("tls+aesgcm/stream", "tls+aesgcm/http"):
        table = results["concurrency"]["by_variant"][variant]["by_clients"]
        assert set(table) == {"1", "2"}
        for entry in table.values():
            assert entry["tokens_unchanged"] is True, "batched clients decode the solo run's greedy tokens"
            assert entry["aggregate_tokens_per_s"]["median"] > 0
            assert entry["aggregate_decode_tokens_per_s"]["median"] > 0
            assert 0 < entry["token_latency_ms"]["p50"] <= entry["token_latency_ms"]["p99"]
        server = results["concurrency"]["by_variant"][variant]["server_batching"]
        assert server["decode_batches"] > 0 and server["mean_rows_per_decode_batch"] >= 1, "read off /metrics"
        assert server["prefills"] >= 3 and server["mean_queue_wait_ms"] >= 0
        assert 1 <= server["prefill_batches"] <= server["prefills"]
    link = results["link"]["by_variant"]
    assert list(link) == ["tls+aesgcm/stream, direct", "tls+aesgcm/stream, 30 ms"]
    through = link["tls+aesgcm/stream, 30 ms"]
    assert through["link_rtt_ms"] == 30.0 and through["ratio_vs_generate"]["n"] == 2
    # Every decode step crosses the relay both ways: at most one token per 30 ms, whatever the machine.
    assert through["decode_tokens_per_s"]["max"] <= 1000 / 30
    assert through["added_beyond_link_ms"]["median"] == round(through["added_ms_per_token"]["median"] - 30, 3)
    # The relay's 30 ms lands in the link's share of each step, not in the server's.
    direct = link["tls+aesgcm/stream, direct"]
    assert through["link_ms_per_step"]["min"] >= 30 > direct["link_ms_per_step"]["max"]
    assert through["server_ms_per_step"]["max"] < 30
    behind = results["link_concurrency"]["by_variant"]["tls+aesgcm/stream, 30 ms"]["by_clients"]
    assert set(behind) == {"1", "2"} and all(e["tokens_unchanged"] is True for e in behind.values())
    assert behind["1"]["aggregate_tokens_per_s"]["max"] <= 1000 / 30, (
        "one client behind the link: a token per 30 ms"
    )
    goals = results["goals"]["tls+aesgcm/stream"]
    assert set(goals) == {"decode", "int8_bytes"}, "no 8-client run in this plan, so no scaling goal"
    assert all(isinstance(g["met"], bool) for g in goals.values())


@pytest.mark.heavy
def test_deploy_outputs_are_written(deploy_run: tuple[dict[str, Any], Path, list[str]]) -> None:
    results, out, _ = deploy_run
    assert json.loads((out / "results.json").read_text()) == results
    text = (out / "results.md").read_text()
    assert text.startswith("# Λ-Split deployment benchmark") and "tls+aesgcm/stream" in text
    assert "## Decode through an emulated link" in text and "tls+aesgcm/stream, 30 ms" in text
    assert "## Concurrent client processes through an emulated link" in text
    for name in ("tokens_per_s_by_mode", "bytes_per_token_by_encoding", "concurrency_scaling"):
        assert (out / f"{name}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_options_choose_the_plan() -> None:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    args = parser.parse_args(
        ["--modes", "tls,plain", "--clients", "8,1,2", "--transports", "http", "--reps", "3"]
    )
    plan = deploy_plan(TINY, quick=False, options=vars(args))
    assert plan.modes == ("tls", "plain") and plan.clients == (1, 2, 8) and plan.transports == ("http",)
    assert plan.reps == 3 and plan.tokens == DeployPlan().tokens
    assert deploy_plan(TINY, quick=False, options=vars(parser.parse_args(["--link-rtt-ms", "20,50.5"]))
                       ).link_rtts_ms == (20.0, 50.5)  # fmt: skip
    quick = deploy_plan(TINY, quick=True, options=vars(parser.parse_args(["--tokens", "5"])))
    assert quick.tokens == 5 and quick.reps < DeployPlan().reps


@pytest.mark.parametrize(
    "argv",
    [["--modes", "tls,bogus"], ["--clients", "0"], ["--clients", "x"], ["--clients", "100"], ["--wire", "fp8"],
     ["--transports", ""], ["--reps", "0"], ["--split", "0:5"], ["--split", "2-4"], ["--link-rtt-ms", "0"],
     ["--link-rtt-ms", "x"], ["--link-rtt-ms", "20,20"], ["--sections", "link,bogus"]],
)  # fmt: skip
def test_bad_options_are_usage_errors(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    with pytest.raises(SystemExit) as exit_info:
        parser.parse_args(argv)
    assert exit_info.value.code == 2
    assert "Traceback" not in capsys.readouterr().err


@pytest.fixture(scope="module")
def bench_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[str, Any], Path, list[str]]:
    out = tmp_path_factory.mktemp("bench")
    messages: list[str] = []
    code, printed = _run(TINY_PLAN, out, messages)
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
    # int8: one fp16 scale per block of 64 values
    assert wire["payload_bytes_per_direction"] == {"fp32": 4 * d, "fp16": 2 * d, "bf16": 2 * d,
                                                   "int8": d + 2 * d // 64}  # fmt: skip
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
    # frame version 3: version, kind, count, flags, seq 0; then "hidden" from the static table (1),
    # encoding, rank 3 and the dims 1, 1, d as varints
    frame_header = 5 + 3 + 2 + len(varint(d))
    assert overhead["sent"]["frame_header"] == overhead["received"]["frame_header"] == frame_header


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


def test_the_link_is_the_round_trip_less_the_server_time_of_the_same_steps() -> None:
    def run(calls: int, seconds: float, server_steps: tuple[int, float]) -> dict[str, Any]:
        return {"decode_trunk_calls": calls, "decode_trunk_call_s": seconds, "server_steps": server_steps}

    runs = [
        run(4, 0.210, (4, 0.200)),  # 2.5 ms of link per step
        run(4, 0.230, (4, 0.210)),  # 5 ms
        run(4, 0.300, (5, 0.100)),  # another client's step counted
    ]
    times = _link_time(runs)
    assert times["link_ms_per_step"]["n"] == times["server_ms_per_step"]["n"] == 2
    assert times["link_ms_per_step"]["min"] == pytest.approx(2.5)
    assert times["link_ms_per_step"]["max"] == pytest.approx(5.0)
    assert times["server_ms_per_step"]["median"] == pytest.approx(51.25)


def test_a_busy_machine_is_named_next_to_the_decode_goal() -> None:
    # tokens/s at 18.6 ± 0.2 (a quiet run) against 11.4-18.1 (a busy neighbour)
    quiet, busy = [18.4, 18.6, 18.7, 18.5, 19.1, 18.6], [13.1, 11.4, 18.1, 14.8, 12.6, 15.6]
    assert steadiness({"a": quiet})["steady"] is True and steadiness({"a": busy})["steady"] is False
    assert steadiness({"a": [18.0]})["steady"] is None, "one sample cannot tell"
    warnings: list[str] = []
    mixed = _steadiness("decode", {"generate()": quiet, "tls+aesgcm/stream": busy}, warnings.append)
    assert mixed["steady"] is False and mixed["variant"] == "tls+aesgcm/stream", (
        "the most variable speed decides"
    )
    assert warnings == [
        "decode: warning: tls+aesgcm/stream ran at 11.4–18.1 tokens/s across the repetitions (variation 17%, "
        "steady is ≤ 5%): the machine was busy and the paired ratios are not reliable; rerun on a quiet machine "
        "or with more --reps"
    ]
    assert _steadiness("decode", {"generate()": quiet}, warnings.append)["steady"] and len(warnings) == 1
    for split_speeds, steady in ((quiet, True), (busy, False)):
        record: dict[str, Any] = {"decode": {
            "wire": "fp16", "prompt_tokens": 47, "new_tokens": 32, "reps": 6, "notes": [],
            "generate": {"decode_tokens_per_s": summarize(quiet), "ttft_ms": summarize([140.0])},
            "by_variant": {"tls+aesgcm/stream": {
                "decode_tokens_per_s": summarize(split_speeds), "ratio_vs_generate": summarize([0.95, 0.96]),
                "added_ms_per_token": summarize([1.0]), "ttft_ms": summarize([145.0]), "tokens_equal_generate": 6}},
            "steadiness": steadiness({"generate()": quiet, "tls+aesgcm/stream": split_speeds}),
        }}  # fmt: skip
        record["goals"] = goals(record)
        decode_goal = record["goals"]["tls+aesgcm/stream"]["decode"]
        assert decode_goal["met"] is True and decode_goal["steady"] is steady
        text = "\n".join(_deploy_report._goals(record) + _deploy_report._decode(record))
        assert ("machine unsteady" in text) is not steady
        # the medians meet the goal, but an unsteady run cannot tell
        assert ("**met**" in text) is steady and ("**unsettled**" in text) is not steady
        assert ("**unsteady machine**" in text) is not steady and ("steady machine:" in text) is steady
