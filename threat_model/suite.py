"""``lambda-split eavesdrop``: the automated eavesdropping suite against a live loopback server.

For every requested security mode it starts the real trunk server (fresh credentials in
a temporary directory), runs real client sessions while capturing the packets (AF_PACKET
when privileged, else an in-path relay; the report names which), and judges the capture:

* every mode: no prompt or output text, no token-id sequence, no pixels on the wire;
* ``tls``, ``aesgcm``, ``tls+aesgcm``: no plaintext hidden state or latent either, no frame
  decodes, so the attacks recover nothing;
* ``plain``: the hidden states are on the wire and the suite *requires* exact prompt
  inversion and tail replay to succeed, proving the attacks work;
* positive controls (leaky baselines, and plain mode's hidden states) must all fire.

The exit code is 0 when the policy holds and 1 otherwise. Use :func:`add_arguments` to
build the command line and :func:`run_eavesdrop` (or :func:`run_from_args`) to run it.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from threat_model.capture import Method

if TYPE_CHECKING:  # the live machinery imports torch; the CLI parser must not
    from threat_model._live import CaptureFault, TransportWrapper

MODES = ("plain", "tls", "aesgcm", "tls+aesgcm")
DEFAULT_PROMPT = "I live in Paris."
DIFFUSION_PROMPT = "a photo of my passport lying on the kitchen table"
TRAFFIC_PROMPTS = (
    ("Hi.", 3),
    ("What is the weather like in Paris in the spring?", 6),
    ("Please write me a long and detailed history of the city of Paris, from the Romans to today.", 10),
)
WEISS_TEXT = "Paris is the capital of France, and its history runs from a Celtic village to a modern city."
Progress = Callable[[str], None]

__all__ = ["MODES", "SuiteOptions", "add_arguments", "run_eavesdrop", "run_from_args"]


@dataclass(frozen=True)
class SuiteOptions:
    """Everything but the mode, output and model; the keyword arguments of :func:`run_eavesdrop`."""

    split: str = "2:-2"
    wire: str = "fp16"
    prompt: str = DEFAULT_PROMPT
    max_new_tokens: int = 8
    chat: bool = False
    capture: Method = "auto"
    diffusion: bool = True
    diffusion_model: str = "tiny-random-sd"
    diffusion_steps: int = 4
    guidance: float = 5.0
    sweep: bool = True
    depths: tuple[int, ...] | None = None
    sweep_wires: tuple[str, ...] = ("fp32", "fp16", "bf16", "int8")
    threads: int | None = None  # torch intra-op threads; 1 is steadier on a busy machine
    sessions: int = 4  # LLM sessions per mode: the secret prompt, then the traffic prompts
    # The client's paths to the trunk: every session runs on the first (the default, the stream);
    # each other one gets the secret prompt's session and one diffusion image, judged on their own.
    transports: tuple[Literal["stream", "http"], ...] = ("stream", "http")
    # Negative testing of the suite itself (Python only, no command-line flag): a wrapper around
    # the client transport, running the server and client in plain whatever the mode says, or a
    # fault planted in the captured segments. They apply to the modes asked for, never the control.
    transport_wrapper: TransportWrapper | None = field(default=None, repr=False)
    downgrade_to_plain: bool = False
    capture_fault: CaptureFault | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        if self.max_new_tokens < 3:
            raise ValueError("max_new_tokens must be at least 3 (the traffic analysis needs decode steps)")
        if self.threads is not None and self.threads < 1:
            raise ValueError("threads must be at least 1")
        if not 1 <= self.sessions <= 1 + len(TRAFFIC_PROMPTS):
            raise ValueError(f"sessions must be between 1 and {1 + len(TRAFFIC_PROMPTS)}")
        if self.diffusion_steps < 1:
            raise ValueError("diffusion_steps must be at least 1")
        if not self.prompt.strip():
            raise ValueError("empty prompt")
        if not self.transports or len(set(self.transports)) != len(self.transports):
            raise ValueError("transports: one or more distinct kinds")
        if bad := set(self.transports) - {"stream", "http"}:
            raise ValueError(f"unknown transports {sorted(bad)}; choose stream and/or http")


def _int_list(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError("split depths must be positive")
    return values


def _wire_list(text: str) -> tuple[str, ...]:
    values = tuple(v.strip() for v in text.split(",") if v.strip())
    bad = [v for v in values if v not in ("fp32", "fp16", "bf16", "int8")]
    if not values or bad:
        raise argparse.ArgumentTypeError(f"wire encodings are fp32, fp16, bf16, int8; got {text!r}")
    return values


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of ``lambda-split eavesdrop``; their ``dest`` names are run_eavesdrop's arguments."""
    parser.add_argument(
        "--security", default="all", choices=[*MODES, "all"], help="mode to attack (default all)"
    )
    parser.add_argument(
        "--out",
        metavar="DIR",
        help="write report.md, report.json and pcaps/ here (and, unless --no-sweep, the sweep's plot)",
    )
    parser.add_argument("--json", dest="as_json", action="store_true", help="print one JSON object on stdout")
    parser.add_argument(
        "--model", default="tiny-random-llama", help="language model (default tiny-random-llama)"
    )
    parser.add_argument("--split", default="2:-2", help="split A:B of the live runs (default 2:-2)")
    parser.add_argument("--wire", default="fp16", choices=["fp32", "fp16", "bf16", "int8"])
    parser.add_argument("--prompt", default=DEFAULT_PROMPT, help="the secret prompt of the main session")
    parser.add_argument("--max-new-tokens", type=int, default=8)
    parser.add_argument("--chat", action="store_true", help="apply the chat template (longer prompts)")
    parser.add_argument("--capture", default="auto", choices=["auto", "af_packet", "relay"])
    parser.add_argument(
        "--no-diffusion", dest="diffusion", action="store_false", help="skip the diffusion run"
    )
    parser.add_argument("--diffusion-model", default="tiny-random-sd")
    parser.add_argument("--diffusion-steps", type=int, default=4)
    parser.add_argument("--no-sweep", dest="sweep", action="store_false", help="skip the attack sweep")
    parser.add_argument("--depths", type=_int_list, help="split depths A of the sweep, e.g. 1,2,4,8,12")
    parser.add_argument("--sweep-wires", type=_wire_list, default=("fp32", "fp16", "bf16", "int8"))
    parser.add_argument("--threads", type=int, help="torch threads (1 is steadier on a busy machine)")
    parser.add_argument(
        "--transport",
        choices=("stream", "http"),
        default="stream",
        help="the client's path for every session (default stream, the client's default); the other "
        "path carries one more session and image, judged on their own",
    )
    parser.add_argument(
        "--sessions",
        type=int,
        default=4,
        help="LLM sessions per mode (default 4; the traffic analysis needs at least 3)",
    )


_SELF_TEST = ("transport_wrapper", "downgrade_to_plain", "capture_fault")


def run_from_args(args: argparse.Namespace, progress: Progress) -> int:
    """Run with a namespace built by a parser that :func:`add_arguments` filled."""
    names = {f.name for f in dataclasses.fields(SuiteOptions)} - set(_SELF_TEST)
    options = {name: getattr(args, name) for name in names if getattr(args, name, None) is not None}
    if getattr(args, "transport", None) is not None:
        options["transports"] = (args.transport, "http" if args.transport == "stream" else "stream")
    return run_eavesdrop(
        security=args.security,
        out=args.out,
        as_json=args.as_json,
        model=args.model,
        progress=progress,
        **options,
    )


def run_eavesdrop(
    *, security: str, out: str | None, as_json: bool, model: str, progress: Progress, **options: Any
) -> int:
    """Run the suite; print a summary (or one JSON object); write files under ``out``; return the exit code."""
    from threat_model import report as render

    opts = SuiteOptions(**options)
    if security != "all" and security not in MODES:
        raise ValueError(f"unknown security mode {security!r}")
    modes = list(MODES) if security == "all" else [security]
    out_dir = Path(out) if out else None
    if out_dir is not None:
        (out_dir / "pcaps").mkdir(parents=True, exist_ok=True)
    result = collect(modes, model, opts, out_dir, progress)
    if out_dir is not None:
        result["files"] = render.write_outputs(result, out_dir)
    if as_json:
        print(json.dumps(result, allow_nan=False, default=str))
    else:
        sys.stdout.write(render.render_text(result))
        sys.stdout.flush()
    return 0 if result["policy"]["passed"] else 1


def _pcaps(sessions: Sequence[Any], out_dir: Path | None, stem: str) -> list[str]:
    if out_dir is None:
        return []
    paths = []
    for number, session in enumerate(sessions):
        path = out_dir / "pcaps" / f"{stem}-{number}.pcap"
        session.capture.write_pcap(path)
        paths.append(str(path))
    return paths


def collect(
    modes: Sequence[str], model: str, opts: SuiteOptions, out_dir: Path | None, progress: Progress
) -> dict[str, Any]:
    """Run every mode (and the controls and the sweep) and return the JSON-ready report."""
    from lambda_split import encode_prompts, load_llm_service, preload, resolve
    from secure_channel import generate_credentials
    from threat_model import _controls as controls
    from threat_model._modes import Attacker, evaluate_diffusion, evaluate_llm

    if opts.threads is not None:
        import torch

        torch.set_num_threads(opts.threads)
    progress(f"loading {model}")
    checkpoint = preload(resolve(model))
    attacker = Attacker(checkpoint, opts.split)
    prompts = [(opts.prompt, opts.max_new_tokens), *TRAFFIC_PROMPTS][: opts.sessions]
    results: dict[str, Any] = {}
    methods: set[str] = set()
    from threat_model._live import LLMClient, live_server, tap_service

    server_views: dict[str, Any] = {}
    truth_ids: list[int] | None = None
    with tempfile.TemporaryDirectory(prefix="lambda-split-eavesdrop-") as keys:
        progress("creating fresh credentials")
        generate_credentials(keys, days=1)
        run_modes = [*modes, *(["plain"] if "plain" not in modes else [])]
        for index, mode in enumerate(run_modes):
            control = index >= len(modes)
            actual = "plain" if opts.downgrade_to_plain and not control else mode
            progress(f"{mode}: trunk server {opts.split} of {model}, capturing {len(prompts)} sessions")
            service = load_llm_service(checkpoint, opts.split, security=actual)
            tap = tap_service(service)
            client = LLMClient(
                checkpoint,
                opts.wire,
                opts.chat,
                None if control else opts.transport_wrapper,
                None if control else opts.capture_fault,
            )
            main, *others = opts.transports
            runs: dict[str, list[Any]] = {}
            with live_server(service, model=model, split=opts.split, security=actual, keys=keys) as server:
                runs[main] = [
                    client.session(server, actual, keys, p, n, opts.capture, f"llm session {i}", main)
                    for i, (p, n) in enumerate(prompts)
                ]
                for kind in others:
                    p, n = prompts[0]
                    runs[kind] = [
                        client.session(server, actual, keys, p, n, opts.capture, f"llm {kind} session", kind)
                    ]
            name = "plain (control)" if control else mode
            progress(f"{mode}: checking the capture, scanning it and attacking what decodes")
            for path, sessions in runs.items():
                methods |= {s.capture.method for s in sessions}
                evaluated = evaluate_llm(mode, sessions, wire=opts.wire, attacker=attacker)
                evaluated["transport"] = path
                evaluated["pcaps"] = _pcaps(
                    sessions, out_dir, f"llm-{mode}" + ("" if path == main else f"-{path}")
                )
                evaluated["split"] = list(client.split_client.info.split)
                results.setdefault(name, {})["llm" if path == main else f"llm-{path}"] = evaluated
            if actual == "plain" and truth_ids is None:
                truth_ids = runs[main][0].prompt_ids  # the client's own prompt ids, for the sweep
            everything = [s for sessions in runs.values() for s in sessions]  # in the order they ran
            server_views[name] = _server_view(
                attacker, tap, everything, opts.wire, every_prompt=actual == "plain"
            )
        if opts.diffusion:
            _run_diffusion(
                run_modes, modes, opts, keys, out_dir, results, methods, progress, evaluate_diffusion
            )
        method: Method = (
            opts.capture if opts.capture != "auto" else ("af_packet" if "af_packet" in methods else "relay")
        )
        progress("positive controls: leaky cloud baselines")
        pcap_dir = out_dir / "pcaps" if out_dir else None
        ids, _ = encode_prompts(checkpoint.tokenizer, [opts.prompt], chat=opts.chat)
        control_rows = controls.llm_controls(opts.prompt, ids[0].tolist(), method=method, pcap_dir=pcap_dir)
        control_rows.append(
            controls.streaming_token_lengths(keys, WEISS_TEXT, method=method, pcap_dir=pcap_dir)
        )
        if opts.diffusion:
            image = next(iter(r["diffusion"]["_image"] for r in results.values() if "diffusion" in r))
            control_rows += controls.diffusion_controls(
                DIFFUSION_PROMPT, image, method=method, pcap_dir=pcap_dir
            )
    for entry in results.values():
        for evaluated in entry.values():
            evaluated.pop("_image", None)
    sweep = None
    if opts.sweep:
        from threat_model.sweep import attack_sweep, default_depths

        depths = opts.depths or default_depths(model, int(checkpoint.config.num_hidden_layers))
        progress(f"attack sweep over split depths {list(depths)} and wires {list(opts.sweep_wires)}")
        rows = attack_sweep(
            checkpoint, truth_ids or ids[0].tolist(), depths=depths, wires=opts.sweep_wires, progress=progress
        )
        sweep = {"model": model, "depths": list(depths), "wires": list(opts.sweep_wires), "rows": rows}
    return _assemble(modes, model, opts, results, control_rows, server_views, sweep, methods)


def _run_diffusion(
    run_modes: Sequence[str],
    modes: Sequence[str],
    opts: SuiteOptions,
    keys: str,
    out_dir: Path | None,
    results: dict[str, Any],
    methods: set[str],
    progress: Progress,
    evaluate: Callable[..., dict[str, Any]],
) -> None:
    from lambda_split.diffusion import load_diffusion_service, resolve_diffusion

    source = resolve_diffusion(opts.diffusion_model)
    for index, mode in enumerate(run_modes):
        control = index >= len(modes)
        actual = "plain" if opts.downgrade_to_plain and not control else mode
        progress(f"{mode}: diffusion trunk server ({opts.diffusion_model}), one captured image")
        service = load_diffusion_service(opts.diffusion_model, security=actual)
        from threat_model._live import diffusion_session, live_server

        with live_server(
            service, model=opts.diffusion_model, split="2:-2", security=actual, keys=keys
        ) as server:
            sessions = {
                kind: diffusion_session(
                    server,
                    actual,
                    keys,
                    source,
                    DIFFUSION_PROMPT,
                    wire=opts.wire,
                    steps=opts.diffusion_steps,
                    guidance=opts.guidance,
                    seed=7,
                    method=opts.capture,
                    fault=None if control else opts.capture_fault,
                    wrapper=None if control else opts.transport_wrapper,
                    transport_kind=kind,
                    name=f"diffusion {kind} session",
                )
                for kind in opts.transports
            }
        for kind, session in sessions.items():
            methods.add(session.capture.method)
            evaluated = evaluate(mode, session, wire=opts.wire, guidance=opts.guidance)
            evaluated["transport"] = kind
            main = kind == opts.transports[0]
            evaluated["pcaps"] = _pcaps(
                [session], out_dir, f"diffusion-{mode}" + ("" if main else f"-{kind}")
            )
            evaluated["_image"] = session.image
            key = "diffusion" if main else f"diffusion-{kind}"
            results.setdefault(mode if index < len(modes) else "plain (control)", {})[key] = evaluated


def _server_view(
    attacker: Any, tap: Any, sessions: Sequence[Any], wire: str, *, every_prompt: bool
) -> dict[str, Any]:
    """What the curious trunk server recovers in this mode, from the tensors it actually received.

    The main prompt is inverted in every mode; every prompt (for the cost range) once, in plain.
    """
    views = tap.views()
    if len(views) != len(sessions):
        return {"error": f"the server saw {len(views)} sessions, the client ran {len(sessions)}"}
    pairs = list(zip(views, sessions, strict=True))[: len(views) if every_prompt else 1]
    # the server decoded ``wire``-encoded frames: the search stops within that rounding bound
    inversions = [attacker.invert(seen[:1], wire, s.prompt_ids) for (seen, _), s in pairs]
    _, returned = views[0]
    replay = attacker.replay(returned, len(sessions[0].prompt_ids), sessions[0].token_ids)
    per_token = [r.forwards_per_token for r in inversions]
    return {
        "inversion_accuracy": inversions[0].accuracy,
        "all_prompts_inverted": all(r.accuracy == 1.0 for r in inversions),
        "inversion_forwards_per_token": [round(min(per_token), 1), round(max(per_token), 1)],
        "prompts": len(inversions),
        "tail_replay_accuracy": replay.accuracy,
    }


def _assemble(
    modes: Sequence[str],
    model: str,
    opts: SuiteOptions,
    results: dict[str, Any],
    control_rows: list[dict[str, Any]],
    server_views: dict[str, Any],
    sweep: dict[str, Any] | None,
    methods: set[str],
) -> dict[str, Any]:
    failures = [
        f"{mode}/{kind}: {c['check']} ({c['detail']})"
        for mode, entry in results.items()
        for kind, evaluated in entry.items()
        for c in evaluated["checks"]
        if not c["passed"]
    ]
    failures += [f"control {c['control']} did not fire" for c in control_rows if not c["fired"]]
    warnings = [
        "the trunk server sees hidden states in every mode; with the public weights it recovers the "
        "prompt and the answer (see server_view). Encryption protects against the wire, not the server."
    ]
    if "plain" in modes:
        warnings.insert(
            0,
            "plain mode gives NO confidentiality against a known-model eavesdropper: the hidden states on the "
            "wire invert to the exact prompt and replay to the exact answer.",
        )
    if "relay" in methods:
        warnings.append(
            "captured with the in-path relay (no CAP_NET_RAW): bytes are real, segmentation is the relay's"
        )
    if opts.downgrade_to_plain or opts.transport_wrapper is not None or opts.capture_fault is not None:
        warnings.append("negative test: the transport was deliberately weakened; this run must fail")
    return {
        "command": "lambda-split eavesdrop",
        "model": model,
        "split": opts.split,
        "wire": opts.wire,
        "modes": list(modes),
        "capture_method": sorted(methods),
        "prompt": opts.prompt,
        "diffusion_model": opts.diffusion_model if opts.diffusion else None,
        "policy": {"passed": not failures, "failures": failures},
        "results": results,
        "controls": control_rows,
        "server_view": server_views,
        "sweep": sweep,
        "warnings": warnings,
    }
