"""Time to first token of a conversation's fifth turn through ``lambda-split local``, with and without
reuse of the trunk session, the trunk server in its own process.

    OMP_NUM_THREADS=1 python benchmarks/local_reuse.py [--model smollm2-135m] [--security tls+aesgcm]
                                                      [--reps 3] [--tokens 48]

Starts ``lambda-split serve`` as a child process and two local endpoints in this process on one
client: one keeps conversations (the default), one keeps none (``--conversations 0``). Per
repetition, the same five-turn conversation (greedy, each answer sent back as the assistant turn)
runs through both, interleaved; the time to first token is measured by the ``openai`` client, from
sending the request to the first streamed text. Prints one JSON object with the medians, and
checks that both endpoints gave the same answers.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from typing import Any

import openai

from lambda_split import SplitClient
from lambda_split.local_api import BackgroundLocal, ConversationCache, LocalEngine, build_app
from secure_channel import generate_credentials

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from stream_vs_http import serve  # the sibling script's server launcher

TURNS = [
    "What is a transformer language model?",
    "How does attention work in it?",
    "Why is the KV cache useful?",
    "What does splitting a model between a phone and a server change?",
    "Summarise our conversation in two sentences.",
]


def conversation(url: str, rep: int, tokens: int) -> list[dict[str, Any]]:
    messages: list[dict[str, str]] = [
        {"role": "system", "content": f"You are a concise tutor (session {rep})."}
    ]
    turns = []
    with openai.OpenAI(base_url=url + "/v1", api_key="unused", timeout=600) as client:
        for turn in TURNS:
            messages.append({"role": "user", "content": turn})
            started = time.perf_counter()
            first = None
            parts: list[str] = []
            usage: Any = None
            stream = client.chat.completions.create(
                model="m",
                messages=messages,  # type: ignore[arg-type]
                max_tokens=tokens,
                temperature=0,
                stream=True,
                stream_options={"include_usage": True},
            )
            for chunk in stream:
                for choice in chunk.choices:
                    if choice.delta.content:
                        first = first or time.perf_counter() - started
                        parts.append(choice.delta.content)
                usage = chunk.usage or usage
            answer = "".join(parts)
            messages.append({"role": "assistant", "content": answer})
            turns.append(
                {
                    "ttft_s": first,
                    "answer": answer,
                    "prompt_tokens": usage.prompt_tokens,
                    "cached_tokens": usage.prompt_tokens_details.cached_tokens,
                }
            )
    return turns


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--split", default="2:-2")
    parser.add_argument("--security", default="tls+aesgcm")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--tokens", type=int, default=48)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as keys:
        generate_credentials(keys, days=1)
        child, url = serve(args.model, args.split, args.security, keys)
        try:
            with SplitClient.connect(url, security=args.security, keys=keys, model=args.model) as client:
                endpoints = {
                    name: BackgroundLocal(build_app(LocalEngine(client, ConversationCache(capacity, 600.0))))
                    for name, capacity in (("reuse", 4), ("no_reuse", 0))
                }
                try:
                    conversation(endpoints["no_reuse"].url, -1, 4)  # warm-up: connections, first-call costs
                    runs: dict[str, list[list[dict[str, Any]]]] = {name: [] for name in endpoints}
                    for rep in range(args.reps):
                        for name, endpoint in endpoints.items():
                            runs[name].append(conversation(endpoint.url, rep, args.tokens))
                            print(
                                f"rep {rep} {name}: turn 5 {runs[name][-1][4]['ttft_s']:.3f} s",
                                file=sys.stderr,
                            )
                finally:
                    for endpoint in endpoints.values():
                        endpoint.stop()
        finally:
            child.terminate()
            child.wait(30)
    same = all(
        [t["answer"] for t in a] == [t["answer"] for t in b]
        for a, b in zip(runs["reuse"], runs["no_reuse"], strict=True)
    )
    result: dict[str, Any] = {
        "model": args.model,
        "security": args.security,
        "split": args.split,
        "tokens_per_turn": args.tokens,
        "reps": args.reps,
        "same_answers": same,
    }
    for name, conversations in runs.items():
        fifth = [c[4] for c in conversations]
        result[name] = {
            "turn5_ttft_s": round(statistics.median(t["ttft_s"] for t in fifth), 4),
            "turn5_prompt_tokens": fifth[0]["prompt_tokens"],
            "turn5_cached_tokens": fifth[0]["cached_tokens"],
            "cached_tokens_by_turn": [t["cached_tokens"] for t in conversations[0]],
        }
    result["speedup"] = round(result["no_reuse"]["turn5_ttft_s"] / result["reuse"]["turn5_ttft_s"], 2)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
