"""results.json, results.md and the PNG plots of a benchmark run."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from lambda_split.cli.bench import _writer
from lambda_split.cli.bench._stats import fmt
from lambda_split.cli.bench._writer import section as _ok
from lambda_split.cli.bench._writer import table as _table

ENCODINGS = ("fp32", "fp16", "bf16", "int8")


def write_outputs(results: dict[str, Any], out: str) -> list[Path]:
    return _writer.write_outputs(results, out, markdown, plots)


def markdown(results: dict[str, Any]) -> str:
    meta = results["meta"]
    lines = [f"# Λ-Split benchmark{' (quick)' if meta['quick'] else ''}", "",
             f"`{meta['command']}` — {meta['date']}; {meta['cpu_model']}, {meta['cores']} cores, "
             f"{meta['ram_gib']} GiB RAM; torch {meta['torch']} ({meta['torch_threads']} threads), "
             f"transformers {meta['transformers']}; load average at start {meta['load_average']}.", "",
             "Figures are median [interquartile range] of interleaved repetitions; ratios pair the runs of one "
             "repetition.", *[f"- {note}" for note in meta["plan"]["notes"]]]  # fmt: skip
    return _writer.document(
        lines, results, (_decode, _ttft, _cache, _wire, _concurrency, _security, _network, _diffusion)
    )


def _decode(results: dict[str, Any]) -> list[str]:
    d = _ok(results, "decode")
    if not d:
        return []
    rows = [[name, fmt(tps, "", 2), fmt(d["ratio_vs_monolithic"].get(name), "×", 3) if name != "monolithic" else "1",
             f"{d['ratio_vs_monolithic'][name]['min']:.3f}–{d['ratio_vs_monolithic'][name]['max']:.3f}"
             if name != "monolithic" else "",
             fmt(d["added_ms_per_token_vs_monolithic"].get(name), " ms", 1) if name != "monolithic" else ""]
            for name, tps in d["tokens_per_s"].items()]  # fmt: skip
    goal = d["goal"]
    return [f"## 1. Decode tokens/s — {d['model']}, split {d['split'][0]}:{d['split'][1]}, wire {d['wire']}, "
            f"{d['new_tokens']} new tokens, {d['reps']} reps", "",
            *_table(["variant", "tokens/s", "× monolithic", "min–max", "added ms/token"], rows), "",
            f"Goal {goal['mode']} ≥ {goal['target_ratio']}× monolithic: median {goal['median_ratio']}× — "
            f"**{'met' if goal['met'] else 'not met'}**."]  # fmt: skip


def _ttft(results: dict[str, Any]) -> list[str]:
    t = _ok(results, "time_to_first_token")
    if not t:
        return []
    variants = list(next(iter(t["by_prompt_tokens"].values()))["ttft_s"])
    rows = []
    for length, entry in t["by_prompt_tokens"].items():
        ms = {
            k: {q: (v * 1000 if isinstance(v, float) else v) for q, v in s.items()}
            for k, s in entry["ttft_s"].items()
        }
        rows.append([length, *(fmt(ms[v], " ms", 1) for v in variants),
                     *(fmt(entry["slowdown_vs_monolithic"][v], "×", 2) for v in variants[1:])])  # fmt: skip
    return [f"## 2. Time to first token — {t['model']}, {t['reps']} reps", "",
            *_table(["prompt tokens", *variants, *(f"{v} ÷ monolithic" for v in variants[1:])], rows)]  # fmt: skip


def _cache(results: dict[str, Any]) -> list[str]:
    c = _ok(results, "kv_cache_vs_recompute")
    if not c:
        return []
    rows = [[run["model"], length, fmt(e["tokens_per_s"]["kv_cache"]), fmt(e["tokens_per_s"]["recompute"]),
             fmt(e["speedup_cache_over_recompute"], "×", 1), e["same_tokens"],
             f"{e['fp16_payload_up_per_step_bytes']['recompute_mean']:,} vs {e['fp16_payload_up_per_step_bytes']['kv_cache']:,}"]
            for run in c["runs"] for length, e in run["by_generated_tokens"].items()]  # fmt: skip
    return ["## 3. Trunk KV cache vs reference recompute (in process, whole generation incl. prefill)", "",
            *_table(["model", "generated", "cache tokens/s", "recompute tokens/s", "speedup", "same tokens",
                     "fp16 bytes up/step (recompute vs cache)"], rows)]  # fmt: skip


def _wire(results: dict[str, Any]) -> list[str]:
    w = _ok(results, "wire")
    if not w:
        return []
    rows = [[mode, *(f"{w['by_mode'][mode][e]['decode_step_bytes']['total']:,} ({w['by_mode'][mode][e]['x_ideal_fp16']}×)"
                     for e in ENCODINGS)] for mode in w["by_mode"]]  # fmt: skip
    acc = w["accuracy_vs_fp32"]
    acc_rows = [[e, f"{acc[e]['bytes_saved_vs_fp32']:.1%}", f"{acc[e]['matching_prefix']}/{acc[e]['tokens']}",
                 acc[e]["positional_agreement"], acc[e]["max_abs_logit_error"]] for e in ENCODINGS[1:]]  # fmt: skip
    return [f"## 4. Wire bytes per generated token (decode step, both directions) — {w['model']}, d = "
            f"{w['hidden_size']}, ideal fp16 = 2·d = {w['ideal_fp16_bytes_per_direction']} B per direction", "",
            *_table(["mode", *ENCODINGS], rows), "",
            f"Accuracy vs fp32 wire (greedy, {acc['mode']}, max |logit| ≈ {acc['fp16']['max_abs_logit']}):",
            "", *_table(["encoding", "bytes saved", "matching prefix", "positional agreement", "max |Δlogit|"],
                        acc_rows)]  # fmt: skip


def _concurrency(results: dict[str, Any]) -> list[str]:
    c = _ok(results, "concurrency")
    if not c:
        return []
    rows = [[n, fmt(e["aggregate_tokens_per_s"]), fmt(e["scaling_vs_1"], "×"), e["token_latency_ms"]["p50"],
             e["token_latency_ms"]["p99"]] for n, e in c["by_clients"].items()]  # fmt: skip
    return [f"## 5. Concurrent clients — {c['model']}, {c['security']}, {c['new_tokens_per_client']} tokens each", "",
            *_table(["clients", "aggregate tokens/s", "× 1 client", "p50 ms/token", "p99 ms/token"], rows),
            "", *[f"- {note}" for note in c["notes"]]]  # fmt: skip


def _security(results: dict[str, Any]) -> list[str]:
    s = _ok(results, "security")
    if not s:
        return []
    rows = [[m, fmt(v["ms"], " ms", 1), f"{v['bytes']:,}"] for m, v in s["connection_setup"].items()]
    rows += [
        [f"{m} re-handshake", fmt(v["ms"], " ms", 1), f"{v['bytes']:,}"]
        for m, v in s["aesgcm_handshake"].items()
    ]
    aead = [[k, v["frame_bytes"], fmt(v["seal"], " µs", 1), fmt(v["open"], " µs", 1)]
            for k, v in s["aead_us_per_frame"].items()]  # fmt: skip
    lines = ["## 6. Security machinery", "", *_table(["connection set-up", "time", "bytes"], rows), "",
             *_table(["AES-GCM record", "fp32 frame bytes", "seal", "open"], aead)]  # fmt: skip
    over = s.get("wire_overhead_bytes")
    if over:
        keys = [k for k in over["sent"] if k != "payload"]
        lines += ["", "Per decode step, bytes added on top of the fp32 payload (plain = HTTP; others = extra over plain):",
                  "", *_table(["direction", "payload", *keys],
                              [[d, over[d]["payload"], *(over[d][k] for k in keys)] for d in ("sent", "received")])]  # fmt: skip
    return lines


def _network(results: dict[str, Any]) -> list[str]:
    n = _ok(results, "network_model")
    if not n:
        return []
    rows = [[name, link, device, f"{m['device_ms'][device]} / {m['trunk_ms']}",
             *(m["links"][link][device][e]["tokens_per_s"] for e in ("fp32", "fp16", "int8")),
             m["device_only_tokens_per_s"][device]]
            for name, m in n["models"].items() for link in m["links"] for device in m["device_ms"]]  # fmt: skip
    return ["## 7. Modelled phone-to-cloud tokens/s (on paper, from the measurements)", "", f"`{n['formula']}`", "",
            *_table(["model", "link", "device", "device / trunk ms", "fp32 tok/s", "fp16 tok/s", "int8 tok/s",
                     "device-only tok/s"], rows), "",
            *[f"- {a}" for a in n["assumptions"]],
            *[f"- {name}: trunk on {m['trunk']}" for name, m in n["models"].items()]]  # fmt: skip


def _diffusion(results: dict[str, Any]) -> list[str]:
    d = results.get("diffusion")
    if not d:
        return []
    if d.get("status") != "measured":
        return ["## 8. Diffusion", "", f"**Gap — not measured:** {d.get('reason') or d.get('error')}"]
    rows = [[e, f"{v['bytes_per_step']:,}", v["psnr_vs_fp32_db"] if v["psnr_vs_fp32_db"] is not None else "ref"]
            for e, v in d["by_encoding"].items()]  # fmt: skip
    return [f"## 8. Diffusion — {d['model']} ({d['pipeline']}), {d['security']}", "",
            f"ms per step: split {fmt(d['ms_per_step']['split'], '', 1)}, monolithic "
            f"{fmt(d['ms_per_step']['monolithic'], '', 1)}; split ÷ monolithic {fmt(d['slowdown_split_vs_monolithic'], '×')}",
            "", *_table(["encoding", "bytes per step", "PSNR vs fp32 (dB)"], rows)]  # fmt: skip


def plots(results: dict[str, Any], directory: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written: list[Path] = []

    def save(fig: Any, name: str) -> None:
        _writer.save_figure(fig, directory / name, written)

    if d := _ok(results, "decode"):
        names = list(d["tokens_per_s"])
        med = [d["tokens_per_s"][n]["median"] for n in names]
        err = [[m - d["tokens_per_s"][n]["q1"] for n, m in zip(names, med, strict=True)],
               [d["tokens_per_s"][n]["q3"] - m for n, m in zip(names, med, strict=True)]]  # fmt: skip
        fig, ax = plt.subplots(figsize=(7, 4))
        colours = ["#888" if n in ("monolithic", "hf_generate") else "#3b7dd8" for n in names]
        bars = ax.bar(names, med, yerr=err, capsize=4, color=colours)
        labels = [
            f"{d['ratio_vs_monolithic'][n]['median']:.2f}×" if n != "monolithic" else "1×" for n in names
        ]
        ax.bar_label(bars, labels, label_type="center", color="white", fontsize=9)
        ax.set_ylabel("decode tokens/s (median, IQR); label: × monolithic")
        ax.set_title(f"{d['model']} split {d['split'][0]}:{d['split'][1]} vs monolithic")
        save(fig, "tokens_per_s_by_mode.png")
    if w := _ok(results, "wire"):
        fig, ax = plt.subplots(figsize=(7, 4))
        modes = list(w["by_mode"])
        width = 0.8 / len(modes)
        for i, mode in enumerate(modes):
            values = [w["by_mode"][mode][e]["decode_step_bytes"]["total"] for e in ENCODINGS]
            ax.bar([x + i * width for x in range(len(ENCODINGS))], values, width, label=mode)
        ax.axhline(2 * w["ideal_fp16_bytes_per_direction"], color="k", ls="--", label="ideal fp16 (2·2·d)")
        ax.set_xticks([x + width * (len(modes) - 1) / 2 for x in range(len(ENCODINGS))], ENCODINGS)
        ax.set_ylabel("socket bytes per token (both directions)")
        ax.set_title(f"{w['model']}: wire bytes per decode step")
        ax.legend(fontsize=8)
        save(fig, "bytes_per_token_by_encoding.png")
    if c := _ok(results, "concurrency"):
        n = [int(k) for k in c["by_clients"]]
        entries = list(c["by_clients"].values())
        fig, ax = plt.subplots(figsize=(7, 4))
        ax.plot(n, [e["aggregate_tokens_per_s"]["median"] for e in entries], "o-", label="aggregate tokens/s")
        ax.set_xlabel("concurrent clients")
        ax.set_ylabel("aggregate tokens/s")
        ax.set_xscale("log", base=2)
        ax.set_xticks(n, [str(x) for x in n])
        ax.set_ylim(bottom=0)
        twin = ax.twinx()
        for q, style in (("p50", "s--"), ("p99", "^:")):
            twin.plot(
                n, [e["token_latency_ms"][q] for e in entries], style, color="C1", label=f"{q} ms/token"
            )
        twin.set_ylabel("per-token latency (ms)")
        twin.set_ylim(bottom=0)
        fig.legend(loc="lower right", bbox_to_anchor=(0.85, 0.15), fontsize=8)
        ax.set_title(f"{c['model']} ({c['security']}): concurrency")
        save(fig, "concurrency_scaling.png")
    if k := _ok(results, "kv_cache_vs_recompute"):
        fig, ax = plt.subplots(figsize=(7, 4))
        for i, run in enumerate(k["runs"]):
            lengths = [int(x) for x in run["by_generated_tokens"]]
            for name, style in (("kv_cache", "o-"), ("recompute", "x--")):
                values = [e["tokens_per_s"][name]["median"] for e in run["by_generated_tokens"].values()]
                ax.plot(lengths, values, style, color=f"C{i}", label=f"{run['model']} {name}")
        ax.set_yscale("log")
        ax.set_xlabel("generated tokens")
        ax.set_ylabel("tokens/s (log)")
        ax.set_title("trunk KV cache vs recompute-every-step")
        ax.legend(fontsize=8)
        save(fig, "cache_vs_recompute.png")
    return written
