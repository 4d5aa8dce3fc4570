"""``lambda-split plan``: choose the spans of a multi-hop trunk (see lambda_split._plan)."""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
from pathlib import Path
from typing import Any

from lambda_split.cli import _args
from secure_channel import SECURITY_MODES


def add_plan_parser(commands: Any) -> None:
    plan = commands.add_parser(
        "plan",
        help="place a trunk's layers over several span servers (exact optimum against memory-proportional)",
    )
    plan.add_argument("--model", required=True, help="model name or path (its layers are placed)")
    plan.add_argument(
        "--servers",
        required=True,
        metavar="FILE",
        help='JSON {"servers": [{"name", "urls", "memory_mb", "layer_ms", "rtt_ms"}]}; layer_ms and rtt_ms '
        "may be left out with --probe",
    )
    plan.add_argument("--split", default="2:-2", help="A:B, the trunk to place (the device keeps the rest)")
    plan.add_argument(
        "--kv-tokens",
        type=_args.non_negative_int,
        default=2048,
        metavar="N",
        help="KV cache positions each server must hold, counted in its memory (default 2048)",
    )
    plan.add_argument(
        "--probe",
        action="store_true",
        help="measure each server's layer time and round trip (a short decode probe of the span it serves)",
    )
    plan.add_argument("--security", choices=SECURITY_MODES, help="security mode, for --probe")
    plan.add_argument("--keys", help="credentials directory, for --probe")
    plan.add_argument(
        "--timeout", type=_args.positive_float, default=60.0, help="per-request timeout (--probe)"
    )
    plan.add_argument("--out", metavar="FILE", help="write the plan (for generate --plan) to FILE")
    plan.add_argument("--json", action="store_true", help="print the plan as one JSON object")
    plan.set_defaults(run=cmd_plan)


def cmd_plan(args: argparse.Namespace) -> int:
    from lambda_split._models import resolve
    from lambda_split._parts import SplitSpec
    from lambda_split._plan import (
        PlanError,
        layer_costs,
        optimal_plan,
        plan_document,
        proportional_plan,
        read_servers,
    )
    from lambda_split.cli import UsageError, progress

    try:
        servers = read_servers(args.servers)
    except PlanError as exc:
        raise UsageError(str(exc)) from None
    if args.probe:
        if args.security is None:
            raise UsageError("--probe needs --security MODE (and --keys DIR) to reach the servers")
        servers = [_probed(server, args, progress) for server in servers]
    missing = [s.name for s in servers if math.isnan(s.layer_s)]
    if missing:
        raise UsageError(f"no layer_ms for {', '.join(missing)}: give it in {args.servers} or pass --probe")
    checkpoint = resolve(args.model)
    try:
        spec = SplitSpec.parse(args.split, int(checkpoint.config.num_hidden_layers))
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    costs = layer_costs(checkpoint, spec.start, spec.stop, kv_tokens=args.kv_tokens)
    naive = proportional_plan(costs, servers)
    try:
        best = optimal_plan(costs, servers)
    except PlanError as exc:  # InfeasiblePlan: the budgets are the input's
        raise UsageError(str(exc)) from None
    document = plan_document(costs, best, naive)
    if args.out:
        Path(args.out).write_text(json.dumps(document, indent=2) + "\n")
    if args.json:
        print(json.dumps(document))
    else:
        print(render(document))
        if args.out:
            progress(f"plan written to {args.out}; use it with: lambda-split generate --plan {args.out} ...")
    return 0


def _probed(server: Any, args: argparse.Namespace, say: Any) -> Any:
    from lambda_split._plan_probe import probe_speed
    from secure_channel import connect_transport

    if not server.urls:
        return server
    url = server.urls[0]
    problem = _args.url_problem(url, args.security)
    if problem:
        from lambda_split.cli import UsageError

        raise UsageError(problem.replace("--server", f"server {server.name}"))
    say(f"probing {server.name} at {url}")
    transport = connect_transport(url, args.security, keys_dir=args.keys, timeout=args.timeout)
    try:
        measured = probe_speed(transport, url)
    finally:
        transport.close()
    say(
        f"{server.name}: span {measured.split[0]}:{measured.split[1]}, step {measured.step_s * 1e3:.2f} ms, "
        f"round trip {measured.rtt_s * 1e3:.2f} ms, {measured.layer_s * 1e3:.3f} ms per layer"
    )
    return dataclasses.replace(server, layer_s=measured.layer_s, rtt_s=measured.rtt_s)


def render(document: dict[str, Any]) -> str:
    lines = [f"{document['model']}: trunk {document['trunk'][0]}:{document['trunk'][1]}"]
    for title, plan in (("optimal", document), ("memory-proportional", document["memory_proportional"])):
        lines.append(
            f"{title}: bottleneck {plan['bottleneck_s'] * 1e3:.2f} ms, one stream {plan['latency_s'] * 1e3:.2f} ms "
            f"per token ({plan['tokens_per_s_one_stream']:.1f} tokens/s)"
            + ("" if plan["feasible"] else f"  INFEASIBLE: {'; '.join(plan['problems'])}")
        )
        for hop in plan["hops"]:
            lines.append(
                f"  {hop['server']:<12} {hop['split'][0]:>3}:{hop['split'][1]:<3} stage {hop['stage_s'] * 1e3:8.2f} ms"
                f"  rtt {hop['rtt_s'] * 1e3:6.2f} ms  memory {hop['memory_bytes'] / 2**20:8.1f} MiB"
            )
    return "\n".join(lines)
