"""The ``lambda-split`` command line. See CONTRACT.md for what scripts rely on.

This is the application layer: unlike the library modules of lambda_split, it may import
the server package, and does so lazily, only for the commands that run a server.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import traceback
from collections.abc import Callable, Sequence
from typing import Any

from lambda_split._errors import (
    FingerprintMismatch,
    LimitExceeded,
    ModelNotFoundError,
    ProtocolMismatch,
    ServerError,
)
from lambda_split._stream import TRANSPORT_KINDS, StreamLink
from lambda_split.cli import _args
from lambda_split.cli import _audit as _audit_cli
from secure_channel import (
    SECURITY_MODES,
    AuthenticationError,
    ChannelError,
    CredentialsError,
    KeysUsageError,
    TransportError,
)

EXIT_OTHER, EXIT_USAGE, EXIT_AUTH, EXIT_SERVER = 1, 2, 3, 4
TRANSPORT_HELP = (
    "stream: one persistent WebSocket per client (default); http: one request per step. "
    "Same security mode either way"
)
DEMO_PROMPT = "In two sentences, why would someone split a language model between a phone and a server?"


class UsageError(Exception):
    """Bad arguments that argparse could not catch; exits 2."""


def progress(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def exit_code(exc: BaseException) -> int:
    from lambda_split._audit import AuditFailed
    from server.config import ConfigError

    if isinstance(exc, AuditFailed):
        return _audit_cli.EXIT_AUDIT_FAILED

    if isinstance(
        exc, (UsageError, ConfigError, ModelNotFoundError, FileExistsError, LimitExceeded, KeysUsageError)
    ):
        return EXIT_USAGE
    if isinstance(exc, (AuthenticationError, CredentialsError)):
        return EXIT_AUTH
    if isinstance(exc, (ServerError, ProtocolMismatch, FingerprintMismatch, TransportError, ChannelError)):
        return EXIT_SERVER
    return EXIT_OTHER


class _Stdout:
    """Streamed text goes through here, so that an error or Ctrl-C mid-stream starts on a new line."""

    line_open = False

    @classmethod
    def stream(cls, _row: int, text: str) -> None:
        print(text, end="", flush=True)
        if text:
            cls.line_open = not text.endswith("\n")

    @classmethod
    def end_line(cls) -> None:
        if cls.line_open:
            print(flush=True)
            cls.line_open = False


def read_prompt(prompt: str | None) -> str:
    if prompt in (None, "-") and sys.stdin.isatty():
        print(
            "reading the prompt from stdin; end it with Ctrl-D (or pass PROMPT)", file=sys.stderr, flush=True
        )
    text = sys.stdin.read() if prompt in (None, "-") else prompt
    if not text or not text.strip():
        raise UsageError("empty prompt: pass PROMPT, or - to read it from stdin")
    return text.strip("\n")


# --- commands ----------------------------------------------------------------------------------


def cmd_serve(args: argparse.Namespace) -> int:
    from server import load_config, serve

    config = load_config(
        args.config,
        model=args.model,
        split=args.split,
        head_depths=args.head_depths,
        security=args.security,
        keys=args.keys,
        host=args.host,
        port=args.port,
        insecure_plain=args.insecure_plain or None,
    ).validate()
    return serve(config, on_ready=lambda url: print(f"listening on {url}", flush=True), progress=progress)


def cmd_generate(args: argparse.Namespace) -> int:
    from lambda_split._client import SplitClient
    from lambda_split._failover import FailoverPolicy
    from lambda_split._generate import GenerationConfig
    from lambda_split.cli._chain import run_chain, wants_chain

    if wants_chain(args):
        return run_chain(args, UsageError, progress, _Stdout.stream)
    if not args.server:
        raise UsageError(
            "give --server URL (or --hop URL for each span of a multi-hop trunk, or --plan FILE)"
        )
    prompt = read_prompt(args.prompt)
    config = _generation_config(args, GenerationConfig)
    servers = list(args.server)
    failover = (
        FailoverPolicy(attempts=args.failover_attempts, deadline_s=args.failover_deadline)
        if args.failover_attempts
        else None
    )
    progress(f"connecting to {', '.join(servers)} ({args.security})")
    with (
        SplitClient.connect(
            servers,
            security=args.security,
            keys=args.keys,
            model=args.model,
            wire=args.wire,
            timeout=args.timeout,
            failover=failover,
            on_failover=lambda event: progress(event.describe()),
            progress=progress,
            prompt_bucket=args.pad_prompt,
            defence=args.defence,
            split=args.split,
            transport_kind=args.transport,
            head_depth=args.head_depth,
        ) as client,
        _audit_cli.verification(args, client, progress),
    ):
        if args.defence is not None:
            progress(f"uplink defence {args.defence.name}: measured, not guaranteed (SECURITY.md)")
        stream = None if args.json else _Stdout.stream
        result = client.generate(prompt, config, chat=not args.raw, on_text=stream)
        stats = client.wire_stats
        if args.json:
            print(json.dumps(_result_json(result, client, stats)))
        else:
            print()
            _Stdout.line_open = False
            progress(_summary(result, client, stats))
    return 0


def _generation_config(args: argparse.Namespace, cls: Any) -> Any:
    try:
        return cls(
            max_new_tokens=args.max_new_tokens,
            temperature=args.temperature,
            top_k=args.top_k,
            top_p=args.top_p,
            seed=args.seed,
            stop_strings=tuple(args.stop or ()),
        )
    except ValueError as exc:
        raise UsageError(str(exc)) from None


def _result_json(result: Any, client: Any, stats: Any) -> dict[str, Any]:
    decode_s = max(result.elapsed_s - result.time_to_first_token_s, 1e-9)
    new = result.new_tokens
    return {
        "text": result.texts[0],
        "token_ids": result.token_ids[0],
        "security": client.transport.security,
        "split": list(client.info.split),
        "wire": client.wire.wire_name,
        "stats": {
            "new_tokens": new,
            "tokens_per_s": round((new - 1) / decode_s if new > 1 else new / max(result.elapsed_s, 1e-9), 3),
            "time_to_first_token_s": round(result.time_to_first_token_s, 4),
            "bytes_sent": stats.bytes_sent,
            "bytes_received": stats.bytes_received,
            "transport": "stream" if isinstance(client.link, StreamLink) else "http",
            "defence": client.defence.name if getattr(client, "defence", None) is not None else None,
            "failovers": client.failovers,
            "failover_s": round(client.failover_s, 4),
            "head_depth": getattr(client, "last_head_depth", None),
        },
    }


def _summary(result: Any, client: Any, stats: Any) -> str:
    data = _result_json(result, client, stats)["stats"]
    per_token = (stats.bytes_sent + stats.bytes_received) / max(result.new_tokens, 1)
    return (
        f"{data['new_tokens']} tokens, {data['tokens_per_s']:.1f} tokens/s, first token "
        f"{data['time_to_first_token_s']:.2f} s, {per_token:,.0f} wire bytes/token, split "
        f"{client.info.split[0]}:{client.info.split[1]}, security {client.transport.security}, "
        f"wire {client.wire.wire_name}"
        + (f", {client.failovers} failover(s) in {client.failover_s:.2f} s" if client.failovers else "")
        + (
            f", head depth {client.last_head_depth}"
            if getattr(client, "head_depth", None) is not None
            else ""
        )
    )


def cmd_imagine(args: argparse.Namespace) -> int:
    import dataclasses

    from lambda_split.diffusion import DiffusionClient, imagine

    prompt = read_prompt(args.prompt)
    progress(f"connecting to {args.server} ({args.security})")
    started = time.perf_counter()

    def on_step(done: int, total: int) -> None:
        print(f"\rstep {done}/{total}", end="" if done < total else "\n", file=sys.stderr, flush=True)

    with DiffusionClient.connect(
        args.server,
        security=args.security,
        keys=args.keys,
        model=args.model,
        wire=args.wire,
        timeout=args.timeout,
        transport_kind=args.transport,
    ) as client:
        stats = imagine(
            client, prompt, args.steps, args.seed, args.out, on_step, guidance_scale=args.guidance
        )
    if args.json:
        print(json.dumps({**dataclasses.asdict(stats), "security": args.security}))
    else:
        progress(
            f"wrote {stats.path} ({stats.width}x{stats.height}) in {time.perf_counter() - started:.1f} s: "
            f"{stats.steps} steps, {stats.bytes_sent:,} bytes sent and {stats.bytes_received:,} received "
            f"({args.security}, wire {stats.wire})"
        )
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    from lambda_split.cli.bench import run_bench

    return run_bench(
        out=args.out,
        as_json=args.json,
        quick=args.quick,
        model=args.model,
        progress=progress,
        threads=args.threads,
        options=vars(args),
    )


def cmd_eavesdrop(args: argparse.Namespace) -> int:
    from threat_model.suite import run_from_args

    return run_from_args(args, progress)


def cmd_frontier(args: argparse.Namespace) -> int:
    from threat_model._frontier_cli import run_from_args

    return run_from_args(args, progress)


def cmd_demo(args: argparse.Namespace) -> int:
    from lambda_split.cli._demo import run_demo

    return run_demo(
        args.security,
        model=args.model,
        split=args.split,
        prompt=args.prompt or DEMO_PROMPT,
        max_new_tokens=args.max_new_tokens,
        as_json=args.json,
        progress=progress,
        stream=_Stdout.stream,
        wire=args.wire,
        transport_kind=args.transport,
    )


# --- parser ------------------------------------------------------------------------------------


def _security(required: bool, default: str | None = None) -> dict[str, Any]:
    return {
        "choices": SECURITY_MODES,
        "required": required,
        "default": default,
        "help": "security mode: " + ", ".join(SECURITY_MODES),
    }


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lambda-split", description="Λ-Split secure split inference")
    parser.add_argument(
        "--debug", action="store_true", help="show tracebacks on errors (before or after COMMAND)"
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {_args.version()}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    from lambda_split.cli._keys import add_keys_parser

    add_keys_parser(commands)

    serve = commands.add_parser("serve", help="run the trunk server")
    serve.add_argument("--model", help="model name or path (default smollm2-135m)")
    serve.add_argument("--split", help="A:B, head [0,A) trunk [A,B) tail [B,N); default 2:-2")
    serve.add_argument(
        "--head-depths",
        type=_args.head_depths,
        metavar="LO:HI",
        help="let each session choose its head depth in [LO, HI] (LO <= A <= HI < B; default: only A)",
    )
    serve.add_argument("--security", **_security(required=False))  # or from --config / environment
    serve.add_argument("--keys", help="credentials directory from 'keys init'")
    serve.add_argument("--host", help="bind address (default 127.0.0.1)")
    serve.add_argument("--port", type=_args.port, help="port (default 8443; 0 picks a free one)")
    serve.add_argument("--config", help="TOML config file")
    serve.add_argument(
        "--insecure-plain", action="store_true", help="allow plain mode on a non-loopback address"
    )
    serve.set_defaults(run=cmd_serve)

    generate = commands.add_parser("generate", help="generate text with the trunk on a server")
    _args.add_generate_servers(generate)
    from lambda_split.cli._chain import add_chain_arguments

    add_chain_arguments(generate)
    generate.add_argument("--security", **_security(required=True))
    generate.add_argument("--keys", help="credentials directory from 'keys init'")
    generate.add_argument("--model", required=True, help="model name or path; must match the server's")
    _decoding_options(generate)
    generate.add_argument("--wire", choices=("fp32", "fp16", "bf16", "int8"), default="fp32")
    generate.add_argument(
        "--split", help="A:B the server must run (optional: the split is read from the server)"
    )
    generate.add_argument(
        "--timeout", type=_args.positive_float, default=60.0, help="per-request timeout in seconds"
    )
    generate.add_argument("--transport", choices=TRANSPORT_KINDS, default="stream", help=TRANSPORT_HELP)
    generate.add_argument("--raw", action="store_true", help="send the prompt without the chat template")
    generate.add_argument(
        "--pad-prompt",
        type=_args.non_negative_int,
        default=0,
        metavar="N",
        help="left-pad the prompt to a multiple of N tokens, so frame sizes show only a bucket of its length",
    )
    _audit_cli.add_generate_options(generate)

    _args.add_defence(generate)
    _args.add_head_depth(generate)
    generate.add_argument("--json", action="store_true", help="print one JSON object")
    generate.add_argument("prompt", nargs="?", help="the prompt, or - (or nothing) to read stdin")
    generate.set_defaults(run=cmd_generate)

    imagine = commands.add_parser("imagine", help="generate an image with the U-Net on a server")
    imagine.add_argument("--server", required=True, help="server URL")
    imagine.add_argument("--security", **_security(required=True))
    imagine.add_argument("--keys", help="credentials directory from 'keys init'")
    imagine.add_argument(
        "--model", required=True, help="tiny-random-sd, tiny-random-sdxl or a pipeline directory"
    )
    imagine.add_argument("--steps", type=_args.positive_int, default=30)
    imagine.add_argument("--seed", type=int, default=0)
    imagine.add_argument(
        "--guidance",
        type=_args.non_negative_float,
        default=5.0,
        help="classifier-free guidance scale (1 = off)",
    )
    imagine.add_argument("--wire", choices=("fp32", "fp16", "bf16", "int8"), default="fp32")
    imagine.add_argument(
        "--timeout", type=_args.positive_float, default=120.0, help="per-request timeout in seconds"
    )
    imagine.add_argument("--transport", choices=TRANSPORT_KINDS, default="stream", help=TRANSPORT_HELP)
    imagine.add_argument("--out", required=True, help="output PNG file")
    imagine.add_argument("--json", action="store_true", help="print one JSON object")
    imagine.add_argument("prompt", nargs="?", help="the prompt, or - (or nothing) to read stdin")
    imagine.set_defaults(run=cmd_imagine)

    from lambda_split.cli._plan import add_plan_parser

    add_plan_parser(commands)

    from lambda_split.cli._local import add_local_parser

    add_local_parser(commands)

    from lambda_split.cli.bench import add_arguments as add_bench_arguments

    _audit_cli.add_parser(commands)
    bench = commands.add_parser(
        "bench", help="measure what each security mode, split and wire encoding costs"
    )
    add_bench_arguments(bench)
    bench.set_defaults(run=cmd_bench)

    from threat_model.suite import add_arguments as add_eavesdrop_arguments

    eavesdrop = commands.add_parser(
        "eavesdrop", help="capture the real packets in each mode, look for leaks and attack what decodes"
    )
    add_eavesdrop_arguments(eavesdrop)
    eavesdrop.set_defaults(run=cmd_eavesdrop)

    from threat_model._frontier_cli import add_arguments as add_frontier_arguments

    frontier = commands.add_parser(
        "frontier", help="measure each uplink defence: recovery by adapted attacks against output quality"
    )
    add_frontier_arguments(frontier)
    frontier.set_defaults(run=cmd_frontier)

    demo = commands.add_parser("demo", help="server and client on this machine, one streamed answer")
    demo.add_argument("--security", **_security(required=False, default="tls+aesgcm"))
    demo.add_argument("--model", default="smollm2-135m")
    demo.add_argument("--split", default="2:-2")
    demo.add_argument("--max-new-tokens", type=_args.positive_int, default=64)
    demo.add_argument("--prompt")
    demo.add_argument("--wire", choices=("fp32", "fp16", "bf16", "int8"), default="fp32")
    demo.add_argument("--json", action="store_true")
    demo.add_argument("--transport", choices=TRANSPORT_KINDS, default="stream", help=TRANSPORT_HELP)
    demo.set_defaults(run=cmd_demo)
    _args.finish(parser)
    return parser


def _decoding_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--max-new-tokens", type=_args.positive_int, default=128)
    parser.add_argument(
        "--temperature", type=_args.non_negative_float, default=0.0, help="0 means greedy (default)"
    )
    parser.add_argument("--top-k", type=_args.non_negative_int, default=0)
    parser.add_argument("--top-p", type=_args.top_p, default=1.0)
    parser.add_argument("--seed", type=int)
    parser.add_argument("--stop", action="append", help="stop string (repeatable)")


def main(argv: Sequence[str] | None = None) -> int:
    args = _args.parse(build_parser(), argv)
    run: Callable[[argparse.Namespace], int] = args.run
    try:
        return run(args)
    except KeyboardInterrupt:
        _Stdout.end_line()
        print("lambda-split: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # one line on stderr, the traceback only with --debug
        _Stdout.end_line()
        if args.debug:
            traceback.print_exc()
        message = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        print(f"lambda-split: error: {message}", file=sys.stderr)
        return exit_code(exc)


if __name__ == "__main__":
    sys.exit(main())
