"""``python -m lambda_split.cli.bench``: the bench command without the main CLI's parser."""

from __future__ import annotations

import argparse
import sys

from lambda_split.cli import progress
from lambda_split.cli.bench import add_arguments, run_bench


def main() -> int:
    parser = argparse.ArgumentParser(prog="lambda-split bench", description="Λ-Split benchmark")
    add_arguments(parser)
    args = parser.parse_args()
    return run_bench(out=args.out, as_json=args.json, quick=args.quick, model=args.model, progress=progress,
                     threads=args.threads, options=vars(args))  # fmt: skip


if __name__ == "__main__":
    sys.exit(main())
