"""results.json, results.md and the PNG plots of a deployment benchmark run."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from lambda_split.cli.bench import _writer
from lambda_split.cli.bench._stats import STEADY_CV, fmt
from lambda_split.cli.bench._writer import section as _ok
from lambda_split.cli.bench._writer import table as _table


def write_outputs(results: dict[str, Any], out: str) -> list[Path]:
    return _writer.write_outputs(results, out, markdown, plots)


def _range(summary: dict[str, Any], digits: int = 3) -> str:
    if summary.get("median") is None:
        return "–"
    return f"{summary['median']:.{digits}f} ({summary['min']:.{digits}f}–{summary['max']:.{digits}f})"


def markdown(results: dict[str, Any]) -> str:
    meta = results["meta"]
    plan = meta["plan"]
    lines = [f"# Λ-Split deployment benchmark{' (quick)' if meta['quick'] else ''}", "",
             f"`{meta['command']}` — {meta['date']}; {meta['cpu_model']}, {meta['cores']} cores, "
             f"{meta['ram_gib']} GiB RAM; torch {meta['torch']} ({meta['torch_threads']} threads), "
             f"transformers {meta['transformers']}; load average at start {meta['load_average']}, at end "
             f"{meta.get('load_average_end')}; {meta.get('elapsed_s')} s.", "",
             f"Model {plan['model']}, split {plan['split']}. The trunk server is `lambda-split serve` in its own "
             "process (one per security mode); concurrent clients are processes of their own. Figures are "
             "median (min–max) of interleaved repetitions; ratios pair the runs of one repetition."]  # fmt: skip
    return _writer.document(
        lines,
        results,
        (_goals, _decode, _wire, _concurrency, _link, _link_concurrency, _capacity, _failover, _replicas),
    )


def _goals(results: dict[str, Any]) -> list[str]:
    rows = []
    for variant, entry in results.get("goals", {}).items():
        if "decode" in entry:
            g = entry["decode"]
            # An unsteady run's paired medians move by more than the goal's margin: either verdict is luck.
            verdict = (
                _met(g["met"])
                if g.get("steady") is not False
                else "**unsettled** (machine unsteady: see the decode section)"
            )
            rows.append([variant, f"decode ≥ {g['target_ratio']}× generate(), ≤ {g['target_added_ms']} ms added",
                         f"{g['ratio']}×, {g['added_ms']} ms", verdict])  # fmt: skip
        if "scaling" in entry:
            g = entry["scaling"]
            rows.append([variant, f"{g['clients']} clients ≥ {g['target']}× one client, tokens unchanged",
                         f"{g['x_one_client']}×, tokens unchanged: {g['tokens_unchanged']}", _met(g["met"])])  # fmt: skip
        if "int8_bytes" in entry:
            g = entry["int8_bytes"]
            rows.append(
                [variant, f"int8 bytes ≤ {g['target']}× fp16", f"{g['int8_over_fp16']}×", _met(g["met"])]
            )
    return ["## Goals", "", *_table(["variant", "goal", "measured", ""], rows)] if rows else []


def _met(met: bool) -> str:
    return "**met**" if met else "**missed**"


def _decode(results: dict[str, Any]) -> list[str]:
    d = _ok(results, "decode")
    if not d:
        return []
    gen = d["generate"]
    rows = [
        [
            "generate()",
            fmt(gen["decode_tokens_per_s"], "", 1),
            "1",
            "0",
            "–",
            "–",
            fmt(gen["ttft_ms"], "", 1),
            "",
        ]
    ]
    rows += [[v, fmt(e["decode_tokens_per_s"], "", 1), _range(e["ratio_vs_generate"]),
              _range(e["added_ms_per_token"], 2), *_link_cells(e), fmt(e["ttft_ms"], "", 1),
              f"{e['tokens_equal_generate']}/{d['reps']}"]
             for v, e in d["by_variant"].items()]  # fmt: skip
    return [f"## Decode vs transformers' generate() — wire {d['wire']}, {d['prompt_tokens']}-token prompt, "
            f"{d['new_tokens']} new tokens, {d['reps']} interleaved reps", "",
            *_table(["mode/transport", "tokens/s", "× generate()", "added ms/token", "server ms/step",
                     "link ms/step", "time to first token (ms)", "tokens = generate()"], rows), "",
            *_steadiness(d), *[f"- {n}" for n in d["notes"]]]  # fmt: skip


def _link_cells(entry: dict[str, Any]) -> list[str]:
    """The server's time and the link's per trunk step (absent from records older than the columns)."""
    return [
        _range(entry[key], 2) if key in entry else "–" for key in ("server_ms_per_step", "link_ms_per_step")
    ]


def _steadiness(section: dict[str, Any]) -> list[str]:
    """One line on how steady the machine was, read off the variants' speeds (none without them)."""
    steady = section.get("steadiness", {})
    if steady.get("cv") is None:
        return []
    spread = (f"the most variable speed across the repetitions, {steady['variant']}'s, varied by "
              f"{steady['cv']:.1%} (coefficient of variation; steady is ≤ {STEADY_CV:.0%})")  # fmt: skip
    if steady["steady"]:
        return [f"- steady machine: {spread}"]
    return [
        f"- **unsteady machine**: {spread}. Something else was using the cores or the memory bus, and "
        "the paired ratios above move with it: rerun on a quiet machine"
    ]


def _link(results: dict[str, Any]) -> list[str]:
    d = _ok(results, "link")
    if not d:
        return []
    gen = d["generate"]
    rows = [
        [
            "generate()",
            "–",
            fmt(gen["decode_tokens_per_s"], "", 1),
            "1",
            "0",
            "–",
            "–",
            "–",
            fmt(gen["ttft_ms"], "", 1),
            "",
        ]
    ]
    rows += [[v, f"{e['link_rtt_ms']:g}" if "link_rtt_ms" in e else "0", fmt(e["decode_tokens_per_s"], "", 1),
              _range(e["ratio_vs_generate"]), _range(e["added_ms_per_token"], 2),
              _range(e["added_beyond_link_ms"], 2) if "added_beyond_link_ms" in e else "–", *_link_cells(e),
              fmt(e["ttft_ms"], "", 1), f"{e['tokens_equal_generate']}/{d['reps']}"]
             for v, e in d["by_variant"].items()]  # fmt: skip
    return [f"## Decode through an emulated link — wire {d['wire']}, {d['prompt_tokens']}-token prompt, "
            f"{d['new_tokens']} new tokens, {d['reps']} interleaved reps", "",
            *_table(["variant", "added round trip (ms)", "tokens/s", "× generate()", "added ms/token",
                     "added beyond the link (ms)", "server ms/step", "link ms/step", "time to first token (ms)",
                     "tokens = generate()"], rows), "",
            *_steadiness(d), *[f"- {n}" for n in d["notes"]]]  # fmt: skip


def _wire(results: dict[str, Any]) -> list[str]:
    w = _ok(results, "wire")
    if not w:
        return []
    wires = list(w["payload_bytes_per_direction"])
    rows = [[v, *(f"{e[x]['total']:,} ({e[x]['sent']:,} + {e[x]['received']:,})" for x in wires),
             e.get("int8_over_fp16", "–")] for v, e in w["by_variant"].items()]  # fmt: skip
    payload = ", ".join(f"{x} {n:,} B" for x, n in w["payload_bytes_per_direction"].items())
    return [f"## Wire bytes per decode token (both directions: sent + received) — d = {w['hidden_size']}", "",
            f"Payload alone, per direction: {payload}.", "",
            *_table(["mode/transport", *wires, "int8 ÷ fp16"], rows), "", *[f"- {n}" for n in w["notes"]]]  # fmt: skip


def _concurrency(results: dict[str, Any]) -> list[str]:
    return _scaling_tables(results, "concurrency", "Concurrent client processes", "tokens_unchanged",
                           "tokens unchanged")  # fmt: skip


def _link_concurrency(results: dict[str, Any]) -> list[str]:
    return _scaling_tables(results, "link_concurrency", "Concurrent client processes through an emulated link",
                           "tokens_unchanged", "tokens unchanged")  # fmt: skip


def _capacity(results: dict[str, Any]) -> list[str]:
    return _scaling_tables(results, "capacity", "Trunk server capacity: devices replaying recorded steps",
                           "outputs_match", "answers match")  # fmt: skip


def _scaling_tables(results: dict[str, Any], name: str, title: str, key: str, label: str) -> list[str]:
    c = _ok(results, name)
    if not c:
        return []
    lines = [f"## {title} — wire {c['wire']}, {c['new_tokens_per_client']} new tokens each, {c['reps']} reps"]
    for variant, entry in c["by_variant"].items():
        rows = [[n, fmt(e["aggregate_tokens_per_s"], "", 1), fmt(e["scaling_vs_first"], "×", 2),
                 fmt(e["aggregate_decode_tokens_per_s"], "", 1), fmt(e["decode_scaling_vs_first"], "×", 2),
                 e["token_latency_ms"]["p50"], e["token_latency_ms"]["p99"],
                 f"{e[key]} (worst {e['max_rel_diff']:.1e})" if "max_rel_diff" in e else e[key]]
                for n, e in entry["by_clients"].items()]  # fmt: skip
        lines += ["", f"### {variant}", "", *_table(["clients", "aggregate tokens/s", "× first", "decode tokens/s", "× first", "p50 ms/token",
                                                      "p99 ms/token", label], rows)]  # fmt: skip
        if b := entry.get("server_batching"):
            lines += ["", f"Server, over this variant's runs: {b['decode_batches']} decode batches, "
                      f"{b['mean_rows_per_decode_batch']} rows each on average (batches by rows, at most: "
                      f"{b['decode_batches_with_rows_at_most']}); {b['prefills']} prefills in {b.get('prefill_batches', '?')} forwards; mean queue wait "
                      f"{b['mean_queue_wait_ms']} ms."]  # fmt: skip
    return [*lines, "", *[f"- {n}" for n in c["notes"]]]


def _failover(results: dict[str, Any]) -> list[str]:
    f = _ok(results, "failover")
    if not f:
        return []
    lines = [f"## Failover: a replica killed (SIGKILL) after token {f['kill_after_token']} — {f['model']}, wire "
             f"{f['wire']}, {f['transport']}, {f['reps']} reps; seconds, median (min–max)"]  # fmt: skip
    for mode, entry in f["by_mode"].items():
        rows = []
        for count, by_history in entry["by_replicas"].items():
            for history, e in by_history.items():
                restart = _range(e["restart_s"], 2) if "restart_s" in e else "–"
                rows.append([count, history, _range(e["exit_s"]), _range(e["detection_s"]), _range(e["wait_s"], 2),
                             _range(e["reconnect_s"]), _range(e["replay_s"]), _range(e["stall_s"], 2), restart,
                             _range(e["undisturbed_step_s"]), f"{e['replay_bytes']['sent']:,}",
                             f"{e['tokens_equal_undisturbed']}/{e['runs']}"])  # fmt: skip
        lines += ["", f"### {mode}", "", *_table(["replicas", "history", "exit", "detection", "wait", "reconnect",
                                                  "replay", "stall", "restart", "normal step", "replay bytes sent",
                                                  "tokens = undisturbed"], rows)]  # fmt: skip
    return [*lines, "", *[f"- {n}" for n in f["notes"]]]


def _replicas(results: dict[str, Any]) -> list[str]:
    r = _ok(results, "replicas")
    if not r:
        return []
    lines = [f"## Replicas: {r['clients']} concurrent clients on 1 and on 2 replicas — {r['model']}, wire "
             f"{r['wire']}, {r['new_tokens_per_client']} tokens each, {r['reps']} reps"]  # fmt: skip
    rows = []
    for mode, entry in r["by_mode"].items():
        if "by_replicas" not in entry:
            continue
        one, two = entry["by_replicas"]["1"], entry["by_replicas"]["2"]
        rows.append([f"{mode}/{entry['transport']}", _range(one["aggregate_tokens_per_s"], 2),
                     _range(two["aggregate_tokens_per_s"], 2), _range(entry["two_over_one"]),
                     str(one["tokens_unchanged"] and two["tokens_unchanged"])])  # fmt: skip
    lines += ["", *_table(["variant", "1 replica tokens/s", "2 replicas tokens/s", "2 ÷ 1", "tokens unchanged"],
                          rows)]  # fmt: skip
    return [*lines, "", *[f"- {n}" for n in r["notes"]]]


def plots(results: dict[str, Any], directory: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written: list[Path] = []

    def save(fig: Any, name: str) -> None:
        _writer.save_figure(fig, directory / name, written)

    if d := _ok(results, "decode"):
        names = list(d["by_variant"])
        med = [d["by_variant"][n]["ratio_vs_generate"]["median"] for n in names]
        low = [m - d["by_variant"][n]["ratio_vs_generate"]["min"] for n, m in zip(names, med, strict=True)]
        high = [d["by_variant"][n]["ratio_vs_generate"]["max"] - m for n, m in zip(names, med, strict=True)]
        fig, ax = plt.subplots(figsize=(8, 4))
        colours = ["#3b7dd8" if n.endswith("/stream") else "#999" for n in names]
        bars = ax.bar(names, med, yerr=[low, high], capsize=4, color=colours)
        ax.bar_label(bars, [f"{m:.2f}×" for m in med], label_type="center", color="white", fontsize=8)
        ax.axhline(1.0, color="k", lw=0.8)
        ax.set_ylabel("decode speed ÷ generate() (median, min–max)")
        ax.set_title(f"{d['model']} split {d['split'][0]}:{d['split'][1]}, wire {d['wire']}")
        ax.tick_params(axis="x", labelrotation=30, labelsize=8)
        save(fig, "tokens_per_s_by_mode.png")
    if w := _ok(results, "wire"):
        fig, ax = plt.subplots(figsize=(8, 4))
        variants, wires = list(w["by_variant"]), list(w["payload_bytes_per_direction"])
        width = 0.8 / len(variants)
        for i, v in enumerate(variants):
            values = [w["by_variant"][v][x]["total"] for x in wires]
            ax.bar([x + i * width for x in range(len(wires))], values, width, label=v)
        payload = [2 * w["payload_bytes_per_direction"][x] for x in wires]
        ax.plot([x + width * (len(variants) - 1) / 2 for x in range(len(wires))], payload, "k_", ms=30,
                label="payload alone")  # fmt: skip
        ax.set_xticks([x + width * (len(variants) - 1) / 2 for x in range(len(wires))], wires)
        ax.set_ylabel("socket bytes per decode token (both directions)")
        ax.legend(fontsize=7)
        save(fig, "bytes_per_token_by_encoding.png")
    if c := _ok(results, "concurrency"):
        fig, ax = plt.subplots(figsize=(8, 4))
        twin = ax.twinx()
        for i, (v, entry) in enumerate(c["by_variant"].items()):
            n = [int(k) for k in entry["by_clients"]]
            rows = list(entry["by_clients"].values())
            ax.plot(n, [e["aggregate_tokens_per_s"]["median"] for e in rows], "o-", color=f"C{i}",
                    label=f"{v} aggregate tokens/s")  # fmt: skip
            twin.plot(n, [e["token_latency_ms"]["p50"] for e in rows], "s--", color=f"C{i}", alpha=0.5,
                      label=f"{v} p50 ms/token")  # fmt: skip
        ax.set_xscale("log", base=2)
        counts = [int(k) for k in next(iter(c["by_variant"].values()))["by_clients"]]
        ax.set_xticks(counts, [str(k) for k in counts])
        ax.set_xlabel("concurrent client processes")
        ax.set_ylabel("aggregate tokens/s")
        twin.set_ylabel("p50 ms per token (dashed)")
        ax.set_ylim(bottom=0)
        twin.set_ylim(bottom=0)
        fig.legend(loc="upper center", fontsize=7, ncol=2)
        ax.set_ylim(top=ax.get_ylim()[1] * 1.25)
        twin.set_ylim(top=twin.get_ylim()[1] * 1.25)
        save(fig, "concurrency_scaling.png")
    return written
