"""The frontier sweep's table (markdown) and plot (recovery against utility, one curve per defence)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

__all__ = ["ATTACK_COLUMNS", "markdown", "plot"]

ATTACK_COLUMNS = (
    ("exact_inversion", "exact inversion"),
    ("adapted_inversion", "adapted inversion"),
    ("ridge_decoder", "ridge (defended)"),
    ("mlp_decoder", "MLP decoder"),
)


def _pct(value: float | None) -> str:
    return "—" if value is None else f"{100 * value:.0f} %"


def markdown(report: dict[str, Any]) -> str:
    lines = [
        f"# Privacy-utility frontier: {report['model']}, split {report['split']}, wire {report['wire']}",
        "",
        "Recovery: share of prompt tokens recovered from the prefill frame, scored against the "
        "client's own token ids. Utility: greedy agreement with the undefended output (share of "
        f"{report['new_tokens']} new tokens reproduced before the first difference; share of prompts "
        f"whose first {report['first_k']} agree) and perplexity on shipped prose "
        f"(undefended {report['baseline_perplexity']}). Measured, not guaranteed.",
        "",
        "| setting | "
        + " | ".join(label for _, label in ATTACK_COLUMNS)
        + " | strongest | tail replay (answer) | greedy agreement | first-k agree | perplexity | useful (≤ 5 %) |",
        "|---" * (len(ATTACK_COLUMNS) + 7) + "|",
    ]
    for row in report["rows"]:
        cells = [_pct(row["attacks"].get(key, {}).get("recovery")) for key, _ in ATTACK_COLUMNS]
        lines.append(
            f"| {row['setting']} | "
            + " | ".join(cells)
            + f" | {_pct(row['recovery'])} | {_pct(row['tail_replay'])} | {_pct(row['agreement'])} | "
            f"{_pct(row['first_k_agree'])} | {row['perplexity']:.2f} (×{row['perplexity_ratio']:.2f}) | "
            f"{'yes' if row['useful'] else 'no'} |"
        )
    lines += ["", "Attack costs (candidate head forwards per prompt token; seconds over all prompts):", ""]
    for row in report["rows"]:
        parts = []
        for key, label in ATTACK_COLUMNS:
            entry = row["attacks"].get(key)
            if entry is None:
                continue
            if "training_states" in entry:
                parts.append(
                    f"{label}: trained on {entry['training_states']:,} states in {entry['seconds']} s"
                )
            else:
                parts.append(f"{label}: {entry['forwards_per_token']:,} forwards/token, {entry['seconds']} s")
        lines.append(f"- {row['setting']}: " + "; ".join(parts))
    cap = report["max_candidates"]
    lines += [
        "",
        f"Inversion searched at most {cap if cap else 'every'} candidates per token, in the public "
        "model's order.",
        "",
        f"Attacker's knowledge: {report['attacker_knowledge']}",
        "",
        f"Prompts ({len(report['prompts'])}, raw, no chat template; tokens attacked):",
        "",
    ]
    lines += [f"- {p['text']} ({p['tokens']} tokens)" for p in report["prompts"]]
    lines += ["", f"Run time {report['seconds']} s on {report['threads']} torch thread(s).", ""]
    return "\n".join(lines)


def plot(report: dict[str, Any], path: Path) -> bool:
    """Recovery under the strongest attack against greedy agreement and perplexity; False if
    matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    figure, axes = plt.subplots(1, 2, figsize=(11, 4.5))
    families: dict[str, list[dict[str, Any]]] = {}
    for row in report["rows"]:
        families.setdefault(row["family"], []).append(row)
    for family, rows in families.items():
        for axis, key in ((axes[0], "agreement"), (axes[1], "perplexity_ratio")):
            xs = [r[key] for r in rows]
            ys = [100 * r["recovery"] for r in rows]
            axis.plot(xs, ys, marker="o", label=family)
            for r, x, y in zip(rows, xs, ys, strict=True):
                axis.annotate(r["setting"], (x, y), fontsize=7, xytext=(3, 3), textcoords="offset points")
    axes[0].set_xlabel("greedy agreement with the undefended output")
    axes[1].set_xlabel("perplexity / undefended perplexity (log)")
    axes[1].set_xscale("log")
    for axis in axes:
        axis.set_ylabel("prompt tokens recovered, strongest attack (%)")
        axis.axhline(5, color="grey", linestyle="--", linewidth=0.8)
        axis.set_ylim(-3, 103)
        axis.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    figure.suptitle(f"Privacy-utility frontier: {report['model']}, split {report['split']}")
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return True
