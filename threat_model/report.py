"""Render an eavesdropping report: a human summary, Markdown, JSON, and the recovery-vs-depth plot."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

__all__ = ["plot_sweep", "render_markdown", "render_text", "write_outputs"]


def _pct(value: Any) -> str:
    return "—" if value is None else f"{100 * float(value):.0f} %"


def _traffic_cells(traffic: dict[str, Any]) -> tuple[str, str, str]:
    if not traffic.get("delimited"):
        return "not delimited", "not delimited", "not delimited"
    prompt, output, tokens = traffic["prompt_length"], traffic["output_length"], traffic["token_lengths"]
    return (
        f"revealed (R²={prompt['r2']:.2f})" if prompt["inferable"] else f"hidden (R²={prompt['r2']:.2f})",
        f"revealed ({_pct(output['exact_rate'])} exact)" if output["exact_rate"] == 1.0 else "not exact",
        "revealed" if tokens["inferable"] else f"hidden ({tokens['distinct_reply_sizes']} reply size)",
    )


def _attack_cell(score: dict[str, Any]) -> str:
    """What the attack recovered from what the capture yielded: tokens of the client's own."""
    return f"{score['recovered']}/{score['of']} ({score['ran_on_frames']} frames)"


def _server_rows(views: dict[str, Any]) -> list[list[str]]:
    rows = []
    for mode, view in views.items():
        if "error" in view:
            rows.append([mode, view["error"], "", "", ""])
            continue
        low, high = view["inversion_forwards_per_token"]
        rows.append([mode, _pct(view["inversion_accuracy"]), "yes" if view["all_prompts_inverted"] else "no",
                     f"{low:g}–{high:g} ({view['prompts']} prompt{'s' if view['prompts'] > 1 else ''})", _pct(view["tail_replay_accuracy"])])  # fmt: skip
    return rows


SERVER_HEADER = ["mode", "prompt inversion", "every prompt exact", "candidate forwards/token", "tail replay"]
COMPLETE_HEADER = ["mode", "session", "connection", "captured c2s/s2c", "client socket sent/received",
                   "transport sent/received", "unread after close", "drops/truncated"]  # fmt: skip


def _completeness_rows(report: dict[str, Any]) -> list[list[str]]:
    rows = []
    for mode, entry in report["results"].items():
        for kind, result in entry.items():
            for session in result.get("completeness", {}).get("sessions", []):
                for c in session["connections"] + session["elsewhere"]:
                    rows.append([f"{mode}/{kind}", session["session"], c["connection"],
                                 f"{c['captured_c2s']:,}/{c.get('captured_s2c', 0):,}",
                                 f"{c['client_sent']:,}/{c.get('client_received', 0):,}",
                                 f"{session['transport_sent']:,}/{session['transport_received']:,}",
                                 str(c.get("unread_after_close", "—")),
                                 f"{session['kernel_drops']}/{session['truncated_frames']}"])  # fmt: skip
    return rows


def _verdict(checks: Sequence[dict[str, Any]]) -> str:
    return "PASS" if all(c["passed"] for c in checks) else "FAIL"


def _llm_rows(report: dict[str, Any]) -> list[list[str]]:
    rows = []
    for mode, entry in report["results"].items():
        for kind, r in entry.items():
            if not kind.startswith("llm"):
                continue
            det, attacks = r["detectors"], r["attacks"]
            inv, rep = attacks["inversion"], attacks["tail_replay"]
            rows.append(
                [
                    f"{mode} ({r.get('transport', 'http')})",
                    "+".join(r["wire"]["visible_as"]),
                    f"{r['wire']['bytes']['c2s']:,}/{r['wire']['bytes']['s2c']:,}",
                    str(det["text"]),
                    str(det["token_ids"]),
                    str(det["hidden_states"]),
                    str(r["frames_decoded"]),
                    _attack_cell(inv),
                    _attack_cell(rep),
                    *_traffic_cells(r["traffic"]),
                    _verdict(r["checks"]),
                ]
            )
    return rows


LLM_HEADER = [
    "mode",
    "wire shows",
    "bytes c2s/s2c",
    "text",
    "token ids",
    "hidden windows",
    "frames decoded",
    "inversion",
    "tail replay",
    "prompt length",
    "output length",
    "token lengths",
    "policy",
]
DIFF_HEADER = [
    "mode",
    "text",
    "pixels/images",
    "latent windows",
    "frames decoded",
    "SSIM x0 per step",
    "policy",
]


def _diffusion_rows(report: dict[str, Any]) -> list[list[str]]:
    rows = []
    for mode, entry in report["results"].items():
        for kind, r in entry.items():
            if not kind.startswith("diffusion"):
                continue
            ssim = ", ".join(f"{s['ssim_x0']:.3f}" for s in r["latent_attack"]) or "—"
            det = r["detectors"]
            rows.append(
                [
                    f"{mode} ({r.get('transport', 'http')})",
                    str(det["text"]),
                    str(det["pixels"]),
                    str(det["latents"]),
                    str(r["frames_decoded"]),
                    ssim,
                    _verdict(r["checks"]),
                ]
            )
    return rows


def _sweep_rows(sweep: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    depths = sweep["depths"]
    header = ["attack", "wire", *(f"A={d}" for d in depths), "cost (forwards/token)"]
    table: dict[tuple[str, str], dict[int, dict[str, Any]]] = {}
    for row in sweep["rows"]:
        table.setdefault((row["attack"], row["wire"]), {})[row["depth"]] = row
    rows = []
    for (attack, wire), by_depth in table.items():
        costs = sorted({by_depth[d]["forwards_per_token"] for d in depths if d in by_depth})
        cost = f"{costs[0]:g}" if len(costs) == 1 else f"{costs[0]:g}–{costs[-1]:g}"
        ranks = sorted({r for d in depths if d in by_depth and (r := by_depth[d].get("mean_candidates"))})
        if ranks:
            cost += (
                f" (mean rank+1: {ranks[0]:g})"
                if len(ranks) == 1
                else f" (mean rank+1: {ranks[0]:g}–{ranks[-1]:g})"
            )
        rows.append(
            [attack, wire, *(_pct(by_depth[d]["accuracy"]) if d in by_depth else "—" for d in depths), cost]
        )
    return header, rows


def _text_table(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(str(x)) for x in column) for column in zip(header, *rows, strict=True)]
    lines = [
        "  ".join(str(x).ljust(w) for x, w in zip(line, widths, strict=True)).rstrip()
        for line in [header, *rows]
    ]
    return "\n".join(lines) + "\n"


def _md_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(x).replace("|", "\\|") for x in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def _head(report: dict[str, Any]) -> str:
    return (
        f"model {report['model']}, split {report['split']}, wire {report['wire']}, "
        f"capture {'+'.join(report['capture_method'])}, modes {', '.join(report['modes'])}"
    )


def render_text(report: dict[str, Any]) -> str:
    policy = report["policy"]
    out = [f"Λ-Split eavesdropping suite: {_head(report)}\n"]
    out.append(f"POLICY {'PASSED' if policy['passed'] else 'FAILED'}\n")
    out += [f"  FAIL {failure}\n" for failure in policy["failures"]]
    out.append("\nLanguage model (detector columns count findings in the capture):\n")
    out.append(_text_table(LLM_HEADER, _llm_rows(report)))
    if (diff := _diffusion_rows(report)) != []:
        out.append(f"\nDiffusion ({report['diffusion_model']}):\n" + _text_table(DIFF_HEADER, diff))
    out.append("\nCapture completeness (captured bytes next to the client's own counters):\n")
    out.append(_text_table(COMPLETE_HEADER, _completeness_rows(report)))
    out.append("\nPositive controls:\n")
    out += [
        f"  {'fired' if c['fired'] else 'DID NOT FIRE':12} {c['control']} ({c['detector']})\n"
        for c in report["controls"]
    ]
    if report["server_view"]:
        out.append("\nCurious trunk server (from the tensors the server received, per mode):\n")
        out.append(_text_table(SERVER_HEADER, _server_rows(report["server_view"])))
    if report["sweep"]:
        header, rows = _sweep_rows(report["sweep"])
        out.append(f"\nAttack sweep on {report['sweep']['model']} (recovery rate vs split depth A):\n")
        out.append(_text_table(header, rows))
    out += [f"\nWARNING: {w}" for w in report["warnings"]]
    files = report.get("files")
    if files:
        out.append(f"\n\nwrote {files['report_md']}, {files['report_json']}, {len(files['pcaps'])} pcaps")
        out.append(f", {files['plot']}" if files.get("plot") else "")
    return "".join(out) + "\n"


def render_markdown(report: dict[str, Any]) -> str:
    policy = report["policy"]
    out = [f"# Λ-Split eavesdropping report\n\n{_head(report)}.\n\n"]
    out.append(f"**Policy {'passed' if policy['passed'] else 'FAILED'}.**\n\n")
    out += [f"- FAIL: {failure}\n" for failure in policy["failures"]]
    out += [f"> **Warning.** {w}\n>\n" for w in report["warnings"]]
    out.append("\n## Language model\n\n" + _md_table(LLM_HEADER, _llm_rows(report)))
    out.append("\n### What the wire shows\n\n")
    for mode, entry in report["results"].items():
        for kind, r in entry.items():
            wire = r["wire"]
            requests = (
                ", ".join(f"`{k}` ×{v}" for k, v in wire["http_requests"].items()) or "none (inside TLS)"
            )
            records = ", ".join(f"{k} ×{v}" for k, v in wire["tls_records"].items()) or "none"
            frames = ", ".join(f"{k} ×{v}" for k, v in wire.get("websocket_messages", {}).items())
            records += f"; WebSocket messages: {frames}" if frames else ""
            out.append(
                f"- **{mode} / {kind}**: TCP connections: {wire['connections']}; HTTP requests visible: {requests}; "
                f"TLS records: {records}; sealed AES-GCM records on the wire: {wire['sealed_records']['c2s']} "
                f"requests + {wire['sealed_records']['s2c']} responses.\n"
            )
    if (diff := _diffusion_rows(report)) != []:
        out.append(f"\n## Diffusion ({report['diffusion_model']})\n\n" + _md_table(DIFF_HEADER, diff))
    out.append("\n## Positive controls\n\n")
    rows = [
        [c["control"], c["detector"], "yes" if c["fired"] else "**no**", str(c["findings"])]
        for c in report["controls"]
    ]
    out.append(_md_table(["control", "detector", "fired", "findings"], rows))
    if report["server_view"]:
        out.append(
            "\n## Curious trunk server\n\nIn every mode the server decrypts the hidden states; the suite "
            "attacks the tensors the server actually received, scored against the client's tokens.\n\n"
        )
        out.append(_md_table(SERVER_HEADER, _server_rows(report["server_view"])))
    out.append(
        "\n## Capture completeness\n\nEvery connection of the client to the server, captured bytes next to "
        "the client's own socket counters and its transport's counters.\n\n"
    )
    out.append(_md_table(COMPLETE_HEADER, _completeness_rows(report)))
    if report["sweep"]:
        header, rows = _sweep_rows(report["sweep"])
        out.append(f"\n## Attack sweep ({report['sweep']['model']})\n\n" + _md_table(header, rows))
        if report.get("files", {}).get("plot"):
            out.append("\n![recovery rate vs split depth](recovery_vs_depth.png)\n")
    return "".join(out)


def plot_sweep(sweep: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    attacks = list(dict.fromkeys(row["attack"] for row in sweep["rows"]))
    fig, axes = plt.subplots(1, len(attacks), figsize=(3.2 * len(attacks), 3.0), sharey=True, squeeze=False)
    for ax, attack in zip(axes[0], attacks, strict=True):
        for number, wire in enumerate(sweep["wires"]):
            points = sorted(
                (r["depth"], r["accuracy"])
                for r in sweep["rows"]
                if r["attack"] == attack and r["wire"] == wire
            )
            style = ("-", "--", "-.", ":")[number % 4]  # equal curves stay visible on top of each other
            ax.plot(
                [d for d, _ in points],
                [100 * a for _, a in points],
                linestyle=style,
                marker="o",
                markersize=8 - 1.5 * (number % 4),
                label=wire,
            )
        ax.set_title(attack.replace("_", " "))
        ax.set_xlabel("split depth A")
        ax.set_xticks(sweep["depths"])
        ax.set_ylim(-5, 105)
    axes[0][0].set_ylabel("tokens recovered (%)")
    axes[0][-1].legend(fontsize="small")
    fig.suptitle(f"{sweep['model']}: recovery from plaintext frames vs split depth", fontsize="medium")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_outputs(report: dict[str, Any], out_dir: Path) -> dict[str, Any]:
    """Write report.json, report.md and (with a sweep) recovery_vs_depth.png; return the file list."""
    pcaps = [p for entry in report["results"].values() for r in entry.values() for p in r["pcaps"]]
    pcaps += [c["pcap"] for c in report["controls"] if c.get("pcap")]
    files: dict[str, Any] = {
        "report_md": str(out_dir / "report.md"),
        "report_json": str(out_dir / "report.json"),
        "plot": None,
        "pcaps": pcaps,
    }
    if report["sweep"]:
        files["plot"] = str(out_dir / "recovery_vs_depth.png")
        plot_sweep(report["sweep"], Path(files["plot"]))
    report = {**report, "files": files}
    (out_dir / "report.md").write_text(render_markdown(report), encoding="utf-8")
    (out_dir / "report.json").write_text(
        json.dumps(report, indent=2, allow_nan=False, default=str) + "\n", encoding="utf-8"
    )
    return files
