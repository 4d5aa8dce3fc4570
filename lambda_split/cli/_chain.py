"""``lambda-split generate --hop URL[,REPLICA...] --hop ...`` (or ``--plan FILE``): the trunk over a chain of span servers.

``--server`` stays what it was (replicas of one trunk); a chain is named hop by hop, in layer
order, each hop with the URLs of the servers that serve its span (the first that answers is used,
the others take over that span on failover). ``--plan FILE`` reads the hops from ``lambda-split plan``.
"""

from __future__ import annotations

import argparse
import json
from typing import Any

from lambda_split.cli import _args


def add_chain_arguments(generate: argparse.ArgumentParser) -> None:
    for action in generate._actions:
        if "--server" in action.option_strings:
            action.required = False  # --server, --hop or --plan: checked in run_chain / cmd_generate
    chain = generate.add_mutually_exclusive_group()
    chain.add_argument(
        "--hop",
        action="append",
        metavar="URL[,URL...]",
        help="a span server of a multi-hop trunk (repeat in layer order; comma-separated replicas of one span)",
    )
    chain.add_argument(
        "--plan", metavar="FILE", help="connect to the hops of a plan from 'lambda-split plan'"
    )


def wants_chain(args: argparse.Namespace) -> bool:
    return bool(getattr(args, "hop", None) or getattr(args, "plan", None))


def hops_of(
    args: argparse.Namespace, usage_error: type[Exception]
) -> tuple[list[list[str]], list[str] | None]:
    """The hops' URLs in order, and the spans a plan asks of them (None without a plan)."""
    if args.server:
        raise usage_error(
            "--server names replicas of one trunk; a chain is given with --hop or --plan, not both"
        )
    spans: list[str] | None = None
    if args.plan:
        from lambda_split._plan import PlanError, read_plan

        try:
            planned = read_plan(args.plan)
        except PlanError as exc:
            raise usage_error(str(exc)) from None
        hops, spans = [list(urls) for _, urls in planned], [span for span, _ in planned]
    else:
        hops = [[url.strip() for url in hop.split(",") if url.strip()] for hop in args.hop]
    seen: set[str] = set()
    for index, urls in enumerate(hops):
        if not urls:
            raise usage_error(f"--hop {index + 1} names no URL")
        for url in urls:
            problem = _args.url_problem(url, args.security)
            if problem:
                raise usage_error(problem.replace("--server", f"hop {index + 1}"))
            if url in seen:
                raise usage_error(f"{url} is given twice; each span server serves one hop")
            seen.add(url)
    return hops, spans


def run_chain(args: argparse.Namespace, usage_error: type[Exception], progress: Any, stream: Any) -> int:
    from lambda_split._chain import ChainClient
    from lambda_split._failover import FailoverPolicy
    from lambda_split._generate import GenerationConfig
    from lambda_split.cli import _generation_config, read_prompt

    hops, spans = hops_of(args, usage_error)
    if getattr(args, "head_depth", None) is not None:
        raise usage_error(
            "--head-depth is not supported with --hop/--plan: a chain's first span fixes the depth"
        )
    if (
        getattr(args, "receipts", False)
        or getattr(args, "transcript", None)
        or getattr(args, "verify_rate", 0) > 0
    ):
        raise usage_error(
            "--receipts, --transcript and --verify-rate are not supported with --hop/--plan yet"
        )
    prompt = read_prompt(args.prompt)
    config = _generation_config(args, GenerationConfig)
    failover = (
        FailoverPolicy(attempts=args.failover_attempts, deadline_s=args.failover_deadline)
        if args.failover_attempts
        else None
    )
    with ChainClient.connect(
        hops,
        security=args.security,
        keys=args.keys,
        model=args.model,
        wire=args.wire,
        timeout=args.timeout,
        failover=failover,
        on_failover=lambda index, event: progress(f"hop {index + 1}: {event.describe()}"),
        progress=progress,
        prompt_bucket=args.pad_prompt,
        spans=spans,
        transport_kind=args.transport,
    ) as client:
        if args.split is not None:
            _check_split(client, args.split, usage_error)
        result = client.generate(prompt, config, chat=not args.raw, on_text=None if args.json else stream)
        data = result_json(result, client)
        if args.json:
            print(json.dumps(data))
        else:
            print()
            stats = data["stats"]
            progress(
                f"{stats['new_tokens']} tokens, {stats['tokens_per_s']:.1f} tokens/s over {len(client.hops)} hops "
                f"({', '.join(f'{h[0]}:{h[1]}' for h in (hop.info.split for hop in client.hops))}), security "
                f"{args.security}, wire {client.wire.wire_name}"
                + (f", {client.failovers} failover(s)" if client.failovers else "")
            )
    return 0


def _check_split(client: Any, split: str, usage_error: type[Exception]) -> None:
    from lambda_split._chain import ChainMismatch
    from lambda_split._parts import SplitSpec

    try:
        want = SplitSpec.parse(split, client.model.spec.num_layers)
    except ValueError as exc:
        raise usage_error(str(exc)) from None
    if (want.start, want.stop) != client.split:
        raise ChainMismatch(f"the chain runs the trunk {client.split[0]}:{client.split[1]}, not {split}")


def result_json(result: Any, client: Any) -> dict[str, Any]:
    """generate --json's object (CONTRACT.md) for a chain: ``split`` is the whole trunk, and
    ``stats.hops`` has each hop's span, server, bytes and failovers."""
    from lambda_split._stream import StreamLink

    decode_s = max(result.elapsed_s - result.time_to_first_token_s, 1e-9)
    new = result.new_tokens
    stats = client.wire_stats
    return {
        "text": result.texts[0],
        "token_ids": result.token_ids[0],
        "security": client.hops[0].transport.security,
        "split": list(client.split),
        "wire": client.wire.wire_name,
        "stats": {
            "new_tokens": new,
            "tokens_per_s": round((new - 1) / decode_s if new > 1 else new / max(result.elapsed_s, 1e-9), 3),
            "time_to_first_token_s": round(result.time_to_first_token_s, 4),
            "bytes_sent": stats.bytes_sent,
            "bytes_received": stats.bytes_received,
            "transport": "stream" if isinstance(client.hops[0].link, StreamLink) else "http",
            "failovers": client.failovers,
            "failover_s": round(client.failover_s, 4),
            "hops": [
                {
                    "split": list(hop.info.split),
                    "url": hop.url,
                    "bytes_sent": hop.wire_stats.bytes_sent,
                    "bytes_received": hop.wire_stats.bytes_received,
                    "failovers": hop.failovers,
                }
                for hop in client.hops
            ],
        },
    }
