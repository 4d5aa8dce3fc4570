"""Render benchmarks/verify/results.json as tables (stdout, Markdown) and detection.png.

python benchmarks/verify/report.py benchmarks/verify
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any


def honest_table(rows: dict[str, Any], model: str) -> list[str]:
    out = [f"| {model} | sessions × steps | max deviation | tolerance | margin | false positives | "
           "audit ms/step | transcript bytes/step |", "|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for wire, row in rows.items():
        margin = row["tolerance"] / row["max_deviation"] if row["max_deviation"] else float("inf")
        out.append(
            f"| {wire} | {row['sessions']} × {row['steps'] // row['sessions']} | {row['max_deviation']:.2g} | "
            f"{row['tolerance']:g} | {'∞' if margin == float('inf') else f'{margin:,.0f}×'} | "
            f"{row['false_positive_sessions']}/{row['sessions']} sessions | {row['audit_ms_per_step']:.1f} | "
            f"{row['transcript_bytes_per_step']:,.0f} |"
        )
    return out


def cheat_table(by_wire: dict[str, dict[str, Any]], model: str) -> list[str]:
    wires = list(by_wire)
    names = sorted({name for rows in by_wire.values() for name in rows}, key=list(CHEATS).index)
    out = [f"| {model}: p (share of steps caught) / sessions caught by a full audit | "
           + " | ".join(wires) + " |", "|---|" + "---|" * len(wires)]  # fmt: skip
    for name in names:
        cells = []
        for wire in wires:
            row = by_wire[wire].get(name)
            cells.append(
                "—"
                if row is None
                else f"{row['p_step']:.3f} / {row['full_audit_caught_sessions']}/{row['sessions']}"
            )
        out.append(f"| {CHEATS[name]} | " + " | ".join(cells) + " |")
    return out


CHEATS = {
    "skip": "middle layer skipped",
    "int4": "trunk quantised to int4",
    "perturb": "weights + 1 % noise",
    "noise": "noise on 1 % of steps",
    "replay": "replayed cached answer",
}


def curve_table(by_wire: dict[str, dict[str, Any]]) -> list[str]:
    out = ["| cheat (wire) | n | q | measured | 1 − (1 − p·q)^n |", "|---|---|---|---|---|"]
    for wire, rows in by_wire.items():
        for name, row in rows.items():
            if (wire, name) != ("fp32", "perturb") and (wire != "fp16" or name == "perturb"):
                continue
            for point in row["curve"]:
                if point["q"] in (0.01, 0.1, 1.0) or name == "noise":
                    out.append(
                        f"| {CHEATS[name]} ({wire}) | {point['n']} | {point['q']:g} | "
                        f"{point['measured']:.3f} | {point['predicted']:.3f} |"
                    )
    return out


def plot(by_wire: dict[str, dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, row in by_wire["fp16"].items():
        n = max(point["n"] for point in row["curve"])
        points = [pt for pt in row["curve"] if pt["n"] == n]
        qs = [pt["q"] for pt in points]
        (line,) = ax.plot(
            qs, [pt["measured"] for pt in points], "o", label=f"{CHEATS[name]} (n={n}, measured)"
        )
        ax.plot(qs, [pt["predicted"] for pt in points], "-", color=line.get_color(), alpha=0.6)
    ax.set_xscale("log")
    ax.set_xlabel("audit rate q (share of steps compared)")
    ax.set_ylabel("P(cheat detected in a session)")
    ax.set_title("Detection vs audit rate, tiny-random-llama, wire fp16 (lines: 1 − (1 − p·q)^n)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    root = Path(sys.argv[1] if len(sys.argv) > 1 else "benchmarks/verify")
    results = json.loads((root / "results.json").read_text())
    lines = [f"Run {results['started']} – {results['finished']}.", ""]
    costs = results["receipt_costs"]
    lines += [f"Receipt: sign {costs['sign_us']:.0f} µs, verify {costs['verify_us']:.0f} µs per step, "
              f"{costs['receipt_bytes_per_step']} bytes per step (signature {costs['signature_bytes_mean']:.1f} "
              "bytes on average).", ""]  # fmt: skip
    lines += honest_table(results["honest_tiny"], "tiny-random-llama")
    if "honest_smollm2" in results:
        lines += ["", *honest_table(results["honest_smollm2"], "smollm2-135m")]
    lines += ["", *cheat_table(results["cheats_tiny"], "tiny-random-llama")]
    if "cheats_smollm2" in results:
        lines += ["", *cheat_table({"int8": results["cheats_smollm2"]}, "smollm2-135m")]
    lines += ["", *curve_table(results["cheats_tiny"])]
    print("\n".join(lines))
    plot(results["cheats_tiny"], root / "detection.png")


if __name__ == "__main__":
    main()
