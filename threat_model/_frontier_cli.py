"""``lambda-split frontier``: its options (cheap to import) and the run (imports the model code)."""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

__all__ = ["add_arguments", "run_from_args"]

Progress = Callable[[str], None]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default="smollm2-135m", help="model name or path (default smollm2-135m)")
    parser.add_argument(
        "--quick", action="store_true", help="tiny-random-llama, 3 prompts, 6 settings (tests)"
    )
    parser.add_argument("--depth", type=int, default=2, help="split depth A of the sweep (split A:N-2)")
    parser.add_argument(
        "--setting",
        action="append",
        help="a setting (repeatable): none, noise:S, quant:int4|int2, permutation, depth:LO-HI",
    )
    parser.add_argument("--prompts", type=int, default=8, help="how many of the shipped prompts")
    parser.add_argument("--new-tokens", type=int, default=12)
    parser.add_argument(
        "--max-candidates", type=int, default=2048, help="inversion candidates per token (0: all)"
    )
    parser.add_argument("--wire", choices=("fp32", "fp16", "bf16", "int8"), default="fp32")
    parser.add_argument("--ppl-tokens", type=int, default=2048, help="prose tokens scored for perplexity")
    parser.add_argument("--no-decoders", action="store_true", help="skip the ridge and MLP decoders")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    parser.add_argument("--out", help="directory for frontier.json, frontier.md and frontier.png")
    parser.add_argument("--json", action="store_true", help="print the report as one JSON object")


def run_from_args(args: argparse.Namespace, progress: Progress) -> int:
    import torch

    from lambda_split import resolve
    from threat_model._frontier_defs import Setting, parse_setting
    from threat_model._frontier_report import markdown, plot
    from threat_model.frontier import DEFAULT_SETTINGS, QUICK_SETTINGS, run_frontier, shipped_lines

    try:
        raw = args.setting or (QUICK_SETTINGS if args.quick else DEFAULT_SETTINGS)
        settings = [parse_setting(s) for s in raw]
        if settings[0].family != "none":
            settings.insert(0, Setting("none"))
        if min(args.prompts, args.new_tokens, args.ppl_tokens) < 1 or args.max_candidates < 0:
            raise ValueError(
                "--prompts, --new-tokens, --ppl-tokens must be at least 1, --max-candidates at least 0"
            )
    except ValueError as exc:
        from lambda_split.cli import UsageError

        raise UsageError(str(exc)) from None
    torch.set_num_threads(args.threads)
    checkpoint = resolve("tiny-random-llama" if args.quick else args.model)
    layers = int(checkpoint.config.num_hidden_layers)
    deepest = max(d for s in settings for d in s.depths(args.depth))
    if args.depth < 1 or deepest >= layers:
        from lambda_split.cli import UsageError

        raise UsageError(f"split depths must lie in 1..{layers - 1} for {checkpoint.name}")
    prompts = shipped_lines("prompts.txt")[: 3 if args.quick else args.prompts]
    out = Path(args.out) if args.out else None
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)

    def save(report: dict[str, Any]) -> None:  # after every setting, so a long run keeps what it measured
        if out is not None:
            (out / "frontier.json").write_text(json.dumps(report, indent=2) + "\n")
            (out / "frontier.md").write_text(markdown(report))

    report = run_frontier(
        checkpoint,
        prompts,
        settings,
        depth=args.depth,
        new_tokens=4 if args.quick else args.new_tokens,
        wire=args.wire,
        max_candidates=args.max_candidates or None,
        ppl_tokens=256 if args.quick else args.ppl_tokens,
        train_tokens=0 if args.no_decoders else (512 if args.quick else 3000),
        mlp_steps=60 if args.quick else 400,
        max_prompt_tokens=16 if args.quick else None,
        progress=progress,
        on_row=save,
    )
    if out is not None:
        save(report)
        report["plot"] = plot(report, out / "frontier.png")
        progress(
            f"frontier: wrote {out}/frontier.json, frontier.md" + (", frontier.png" if report["plot"] else "")
        )
    print(json.dumps(report) if args.json else markdown(report))
    return 0
