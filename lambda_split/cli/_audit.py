"""``lambda-split audit`` and the verification options of ``generate`` (receipts, transcript, spot checks)."""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from secure_channel import SECURITY_MODES

#: ``audit`` found a signed step that the trunk's weights do not reproduce (also ``generate --verify-rate``).
EXIT_AUDIT_FAILED = 5


def rate(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError("must be between 0 and 1")
    return value


def add_generate_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--receipts",
        action="store_true",
        help="ask the server to sign every step and check each signature against ca.pem in --keys",
    )
    parser.add_argument(
        "--transcript",
        metavar="FILE",
        help="write the signed receipts and the frames of every step to FILE, for 'lambda-split audit' "
        "(implies --receipts; FILE holds hidden states: keep it as private as the conversation)",
    )
    parser.add_argument(
        "--verify-rate",
        type=rate,
        default=0.0,
        metavar="R",
        help="recompute a random fraction R of the steps on a local copy of the trunk and stop on a "
        "mismatch (exit 5; implies --receipts; loads the trunk span here unless --audit-server)",
    )
    parser.add_argument(
        "--audit-server",
        metavar="URL",
        help="recompute the --verify-rate steps on this audit replica (same --security and --keys, same "
        "model and split) instead of locally; it receives every hidden state: trust it like the server",
    )


@contextlib.contextmanager
def verification(args: argparse.Namespace, client: Any, progress: Any) -> Iterator[Any]:
    """Turn on what ``generate``'s options ask for, for the life of ``client``."""
    audit_server = getattr(args, "audit_server", None)
    if audit_server and not args.verify_rate > 0:
        from lambda_split.cli import UsageError

        raise UsageError("--audit-server is where --verify-rate's spot checks run: give --verify-rate R > 0")
    if audit_server and getattr(args, "head_depth", None) is not None:
        from lambda_split.cli import UsageError

        raise UsageError("--audit-server is not supported with --head-depth yet (spot checks run locally)")
    if not (args.receipts or args.transcript or args.verify_rate > 0):
        yield None
        return
    from lambda_split._verify import enable_verification

    if not args.keys:
        from lambda_split.cli import UsageError

        raise UsageError("--receipts, --transcript and --verify-rate need --keys DIR (its ca.pem)")
    if args.verify_rate > 0:
        where = f"on the audit replica {audit_server}" if audit_server else "on the local trunk span"
        progress(f"spot-checking {args.verify_rate:.0%} of the steps {where}")
    verified = enable_verification(
        client,
        keys=args.keys,
        transcript=args.transcript,
        verify_rate=args.verify_rate,
        audit_server=audit_server,
        timeout=getattr(args, "timeout", 60.0),
    )
    try:
        yield verified
    finally:
        verified.close()


def add_parser(commands: Any) -> None:
    audit = commands.add_parser(
        "audit",
        help="check a transcript's signed receipts and replay its steps on the trunk's weights",
        description="Exit codes: 0 every audited step matches; 5 a signed step does not (the server did "
        "not run the declared trunk); 4 the receipts do not verify (nothing can be attributed), or the audit "
        "replica (--server) is unreachable or serves another trunk; 3 it refuses our credentials; 2, 1 as usual.",
    )
    audit.add_argument("transcript", metavar="TRANSCRIPT", help="file written by generate --transcript")
    audit.add_argument("--model", required=True, help="the model the server declared (name or path)")
    audit.add_argument(
        "--keys", help="a keys directory (its ca.pem) or a CA PEM file; default: the CA in the transcript"
    )
    audit.add_argument(
        "--tolerance",
        type=float,
        metavar="X",
        help="the largest honest deviation, for every wire encoding (default: the calibrated bounds, "
        "README); raise it for a server whose arithmetic differs from this machine's (a GPU, another dtype)",
    )
    audit.add_argument(
        "--server",
        metavar="URL",
        help="replay the steps on this audit replica (a trunk server of the same model and split) instead "
        "of local weights; needs --security, and --keys DIR for its mode; it sees every hidden state",
    )
    audit.add_argument("--security", choices=SECURITY_MODES, help="the audit replica's security mode")
    audit.add_argument("--json", action="store_true", help="print the report as one JSON object")
    audit.set_defaults(run=cmd_audit)


def cmd_audit(args: argparse.Namespace) -> int:
    from lambda_split._audit import TOLERANCE, audit
    from lambda_split._transcript import TranscriptError

    ca_pem = None
    if args.keys:
        path = Path(args.keys)
        path = path / "ca.pem" if path.is_dir() else path
        try:
            ca_pem = path.read_bytes()
        except OSError as exc:
            raise TranscriptError(f"cannot read the CA {path}: {exc.strerror}") from None
    bounds = None
    if args.tolerance is not None:
        if not args.tolerance > 0:
            from lambda_split.cli import UsageError

            raise UsageError("--tolerance must be a positive number")
        bounds = dict.fromkeys(TOLERANCE, args.tolerance)
    if args.server is None:
        report = audit(args.transcript, args.model, ca_pem=ca_pem, tolerance=bounds)
    else:
        if args.security is None:
            from lambda_split.cli import UsageError

            raise UsageError(
                "--server needs --security MODE (the audit replica's; never a fallback to plain)"
            )
        from lambda_split._replica import connect_replica

        with connect_replica(args.server, security=args.security, keys=args.keys) as replica:
            report = audit(args.transcript, args.model, ca_pem=ca_pem, tolerance=bounds, replica=replica)
    if args.json:
        print(json.dumps(report))
    else:
        for session in report["sessions"]:
            bad = [v["seq"] for v in session["steps"] if v.get("match") is False]
            worst = max((v["deviation"] for v in session["steps"] if v["audited"]), default=0.0)
            print(
                f"session {session['session_id']} ({session['context']['wire']}): "
                f"{len(session['steps'])} steps, worst deviation {worst:.3g}"
                + (f", MISMATCH at steps {bad}" if bad else ", all audited steps match")
            )
        print(
            f"audit {report['verdict'].upper()}: {report['audited_steps']} of {report['steps']} steps audited, "
            f"{report['failed_steps']} failed; receipts valid under CA sha256:{report['ca_sha256'][:16]}… "
            f"({report['ca_source']})"
        )
    if report["verdict"] != "pass":
        print("lambda-split: audit failed: the server signed outputs its declared trunk does not produce",
              file=sys.stderr)  # fmt: skip
        return EXIT_AUDIT_FAILED
    return 0
