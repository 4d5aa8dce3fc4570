"""Argument checks that run before any model loads: each bad value exits 2 with the subcommand's usage.

The ``type=`` functions below raise ``argparse.ArgumentTypeError``; argparse turns that into
``usage: ...`` plus ``error: argument --x: ...`` and exit 2. Checks that need two arguments
at once (a URL and its security mode) run in :func:`parse`, right after argparse.
"""

from __future__ import annotations

import argparse
import os
import re
from collections.abc import Callable, Sequence
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

from lambda_split._names import BUILTIN_DIFFUSION_MODELS, BUILTIN_MODELS

if TYPE_CHECKING:  # the parser loads no torch
    from lambda_split._defences import Defence

_SPLIT = re.compile(r"\s*(\d+)\s*:\s*(-?\d+)\s*")
_TLS_MODES = ("tls", "tls+aesgcm")


def _number(kind: Callable[[str], int | float], text: str) -> int | float:
    try:
        return kind(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected {'an integer' if kind is int else 'a number'}, got {text!r}"
        ) from None


def positive_int(text: str) -> int:
    """An integer >= 1 (``--days``, ``--max-new-tokens``, ``--steps``)."""
    value = int(_number(int, text))
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {text}")
    return value


def non_negative_int(text: str) -> int:
    """An integer >= 0, where 0 means off (``--pad-prompt``, ``--top-k``)."""
    value = int(_number(int, text))
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 (off) or more, got {text}")
    return value


def port(text: str) -> int:
    value = int(_number(int, text))
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(
            f"must be a port between 0 and 65535 (0 picks a free one), got {text}"
        )
    return value


def positive_float(text: str) -> float:
    value = float(_number(float, text))
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be more than 0, got {text}")
    return value


def non_negative_float(text: str) -> float:
    value = float(_number(float, text))
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, got {text}")
    return value


def top_p(text: str) -> float:
    value = float(_number(float, text))
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"must be in (0, 1], got {text}")
    return value


def split(text: str) -> str:
    """``A:B`` with ``A >= 1`` and, when both are counted from the start, ``A <= B``. Kept as text:
    a negative B is resolved once the model's layer count is known."""
    match = _SPLIT.fullmatch(text)
    if not match:
        raise argparse.ArgumentTypeError(f"must look like A:B (for example 2:-2), got {text!r}")
    start, stop = int(match[1]), int(match[2])
    if start < 1:
        raise argparse.ArgumentTypeError(
            f"A must be at least 1 in {text!r}: the head keeps a layer so that raw embeddings never cross the wire"
        )
    if stop >= 0 and stop < start:
        raise argparse.ArgumentTypeError(f"needs A <= B, got {text!r}")
    return text.strip()


def head_depths(text: str) -> str:
    """``LO:HI`` with ``1 <= LO <= HI`` (``serve --head-depths``); checked against the split in the config."""
    from lambda_split._head_depth import HeadDepths

    try:
        return str(HeadDepths.parse(text))
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def head_depth(text: str) -> int | str:
    """``random`` or a layer number >= 1 (``generate`` and ``local --head-depth``)."""
    from lambda_split._head_depth import parse_head_depth

    try:
        return parse_head_depth(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def version() -> str:
    try:
        return metadata.version("lambda-split")
    except metadata.PackageNotFoundError:  # running from a source tree that was never installed
        return "unknown (not installed)"


def url_problem(url: str, security: str) -> str | None:
    """Why ``url`` cannot reach a server in ``security`` mode, or None."""
    scheme = "https" if security in _TLS_MODES else "http"
    form = f"{scheme}://HOST:PORT"
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        return f"--server {url!r} is not a server URL; expected {form} for --security {security}"
    # aesgcm may also cross TLS to a TLS-terminating reverse proxy (deploy/README.md): https://
    if parts.scheme != scheme and not (security == "aesgcm" and parts.scheme == "https"):
        return f"--server {url!r}: --security {security} speaks {scheme}, so the URL must be {form}"
    try:
        parts.port  # noqa: B018 (raises on a bad port)
    except ValueError:
        return f"--server {url!r} has an invalid port; expected {form}"
    if not parts.hostname or parts.path not in ("", "/") or parts.query or parts.fragment:
        return f"--server {url!r} must be just {form}, without a path"
    return None


def model_problem(model: str) -> str | None:
    """Why ``model`` names no model, without loading anything; None if it may."""
    if model in BUILTIN_MODELS or model in BUILTIN_DIFFUSION_MODELS:
        return None
    path = Path(model).expanduser()
    if path.exists():
        return None
    if os.sep in model or model.startswith("~") or path.suffix in (".gguf", ".safetensors"):
        return f"file not found: {model}"
    return (
        f"unknown model {model!r}: expected one of {', '.join(BUILTIN_MODELS + BUILTIN_DIFFUSION_MODELS)}, "
        "a model directory or a .gguf file"
    )


def out_problem(out: str) -> str | None:
    path = Path(out).expanduser()
    if path.suffix.lower() != ".png":
        return f"--out {out!r} must name a .png file"
    parent = path.parent
    if not parent.is_dir():
        return f"--out {out!r}: directory {str(parent)!r} does not exist"
    if not os.access(parent, os.W_OK):
        return f"--out {out!r}: directory {str(parent)!r} is not writable"
    return None


def finish(parser: argparse.ArgumentParser) -> None:
    """Make every subcommand accept ``--debug`` anywhere and remember its own parser, for usage errors."""
    for sub in _subparsers(parser):
        if not any("--debug" in action.option_strings for action in sub._actions):
            sub.add_argument(
                "--debug", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS
            )
        for action in sub._actions:
            if "--split" in action.option_strings:
                action.type = split  # every command that takes --split checks it at parse time
        sub.set_defaults(usage_parser=sub)


def _subparsers(parser: argparse.ArgumentParser) -> list[argparse.ArgumentParser]:
    found: list[argparse.ArgumentParser] = []
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in dict.fromkeys(action.choices.values()):
                found.append(sub)
                found.extend(_subparsers(sub))
    return found


def parse(parser: argparse.ArgumentParser, argv: Sequence[str] | None) -> argparse.Namespace:
    """parse_args, with unknown options reported by the subcommand that was given them, and the
    checks that need several arguments at once; every failure exits 2."""
    args, extras = parser.parse_known_args(argv)
    owner: argparse.ArgumentParser = getattr(args, "usage_parser", parser)
    if extras:
        owner.error(f"unrecognized arguments: {' '.join(extras)}")
    for problem in _problems(args):
        owner.error(problem)
    return args


def add_generate_servers(parser: argparse.ArgumentParser) -> None:
    """``--server URL`` (repeatable: the first that answers is used, the others take over on failover)
    and the failover bounds."""
    parser.add_argument(
        "--server",
        required=True,
        action="append",
        metavar="URL",
        help="server URL, e.g. https://127.0.0.1:8443; give it again for replicas that take over when one is lost",
    )
    parser.add_argument(
        "--failover-attempts",
        type=non_negative_int,
        default=4,
        metavar="N",
        help="passes over the servers to rebuild a lost session (0: no failover; default 4)",
    )
    parser.add_argument(
        "--failover-deadline",
        type=positive_float,
        default=30.0,
        metavar="S",
        help="give up rebuilding a lost session after S seconds (default 30)",
    )


def _problems(args: argparse.Namespace) -> list[str]:
    problems: list[str | None] = []
    if getattr(args, "server", None) and getattr(args, "security", None):
        servers = args.server if isinstance(args.server, list) else [args.server]
        problems.extend(url_problem(server, args.security) for server in servers)
        if len(set(servers)) < len(servers):
            problems.append("--server: the same URL is given twice")
    if getattr(args, "model", None):
        problems.append(model_problem(args.model))
    if getattr(args, "command", None) == "imagine":
        problems.append(out_problem(args.out))
    return [problem for problem in problems if problem]


def defence(text: str) -> Defence:
    """An uplink defence, ``noise:SIGMA`` or ``quant:int4|int2`` (lambda_split._defences)."""
    from lambda_split._defences import Defence

    try:
        return Defence.parse(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def add_defence(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--defence",
        type=defence,
        metavar="SPEC",
        help="uplink defence, off by default; measured, not guaranteed (SECURITY.md): "
        "noise:SIGMA (Gaussian, SIGMA x each position's RMS) or quant:int4|int2",
    )


def add_head_depth(parser: argparse.ArgumentParser) -> None:
    """``--head-depth random|N`` (``generate`` and ``local``): checked here for its form, and against
    the server's ``head_depths`` when the client connects (a depth it does not allow exits 2)."""
    parser.add_argument(
        "--head-depth",
        type=head_depth,
        metavar="random|N",
        help="each session's head depth: random (drawn per session in the server's head_depths) or a "
        "layer N in it; default the split's A. The server always knows it (SECURITY.md)",
    )
