"""``lambda-split local``: the OpenAI-compatible endpoint and chat page on the device."""

from __future__ import annotations

import argparse
import os
from typing import Any

from lambda_split._stream import TRANSPORT_KINDS
from lambda_split.cli import _args
from secure_channel import SECURITY_MODES

API_KEY_ENV = "LAMBDA_SPLIT_API_KEY"


def add_local_parser(commands: Any) -> None:
    local = commands.add_parser(
        "local", help="serve an OpenAI-compatible API and a chat page on this device, trunk on a server"
    )
    local.add_argument("--server", required=True, help="trunk server URL, e.g. https://127.0.0.1:8443")
    local.add_argument(
        "--security",
        required=True,
        choices=SECURITY_MODES,
        help="security mode: " + ", ".join(SECURITY_MODES),
    )
    local.add_argument("--keys", help="credentials directory from 'keys init' or 'keys add-client'")
    local.add_argument("--model", required=True, help="model name or path; must match the server's")
    local.add_argument("--wire", choices=("fp32", "fp16", "bf16", "int8"), default="fp32")
    local.add_argument(
        "--split", help="A:B the server must run (optional: the split is read from the server)"
    )
    local.add_argument("--transport", choices=TRANSPORT_KINDS, help="link to the trunk (as for generate)")
    _args.add_defence(local)
    _args.add_head_depth(local)  # one depth per conversation, kept for all its turns
    local.add_argument(
        "--timeout", type=_args.positive_float, default=60.0, help="per-request timeout to the trunk, seconds"
    )
    local.add_argument("--host", default="127.0.0.1", help="listen address (default 127.0.0.1)")
    local.add_argument(
        "--port", type=_args.port, default=8080, help="port (default 8080; 0 picks a free one)"
    )
    local.add_argument(
        "--allow-remote",
        action="store_true",
        help="allow a non-loopback --host (the endpoint speaks plain HTTP: prompts cross that network in clear)",
    )
    local.add_argument(
        "--api-key",
        help=f"require 'Authorization: Bearer KEY' on /v1/ (better: set {API_KEY_ENV}, kept out of ps)",
    )
    local.add_argument(
        "--conversations",
        type=_args.non_negative_int,
        default=4,
        metavar="N",
        help="conversations kept for multi-turn reuse of the trunk session (0: every request prefills all)",
    )
    local.add_argument(
        "--conversation-idle",
        type=_args.positive_float,
        default=240.0,
        metavar="S",
        help="seconds a kept conversation may stay idle before its trunk session is closed (default 240)",
    )
    local.add_argument(
        "--default-max-tokens",
        type=_args.positive_int,
        default=512,
        metavar="N",
        help="new tokens at most when a request names no max_tokens (default 512)",
    )
    local.set_defaults(run=cmd_local)


def cmd_local(args: argparse.Namespace) -> int:
    from lambda_split.cli import UsageError, progress
    from lambda_split.local_api import is_loopback

    if not is_loopback(args.host) and not args.allow_remote:
        raise UsageError(
            f"--host {args.host} is not a loopback address: the endpoint speaks plain HTTP and would "
            "carry prompts and answers in clear; pass --allow-remote to do it anyway"
        )
    api_key = args.api_key or os.environ.get(API_KEY_ENV) or None
    from lambda_split._client import SplitClient
    from lambda_split.local_api import ConversationCache, LocalEngine, LocalServer, bind, build_app

    listener = bind(args.host, args.port)  # a port in use fails before the model loads
    try:
        progress(f"connecting to {args.server} ({args.security})")
        options: dict[str, Any] = {"transport_kind": args.transport} if args.transport else {}
        client = SplitClient.connect(
            args.server,
            security=args.security,
            keys=args.keys,
            model=args.model,
            wire=args.wire,
            timeout=args.timeout,
            progress=progress,
            split=args.split,
            defence=args.defence,
            head_depth=args.head_depth,
            **options,
        )
    except BaseException:
        listener.close()
        raise
    if args.defence is not None:
        progress(f"uplink defence {args.defence.name}: measured, not guaranteed (SECURITY.md)")
    if args.head_depth is not None:
        progress(
            f"head depth {args.head_depth} per conversation (server allows {client.info.depths}); "
            "the server always knows it (SECURITY.md)"
        )
    with client:
        engine = LocalEngine(
            client,
            ConversationCache(args.conversations, args.conversation_idle),
            default_max_tokens=args.default_max_tokens,
        )
        app = build_app(engine, api_key=api_key, loopback_only=not args.allow_remote)

        def ready(url: str) -> None:
            progress(
                f"chat page {url}/ ; OpenAI base_url {url}/v1" + (" (API key required)" if api_key else "")
            )
            if not is_loopback(args.host):
                progress("warning: listening beyond this machine over plain HTTP")
            print(f"listening on {url}", flush=True)

        LocalServer(app, listener, ready).run()
    progress("local endpoint stopped")
    return 0
