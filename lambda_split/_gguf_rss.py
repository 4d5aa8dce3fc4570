"""Peak resident memory of loading one side of a split, measured in a fresh process.

    python -m lambda_split._gguf_rss smollm2-135m 2:-2 head,tail            # per-part loading
    python -m lambda_split._gguf_rss smollm2-135m 2:-2 trunk --whole-file   # transformers' loader

Prints one JSON object: the peak RSS of the process after loading the parts,
and the same peak just before loading (interpreter, torch and transformers imported, the
config read), so that the loading's own share is their difference. Run each measurement in
its own process: a peak never goes down.

The peak is the kernel's high-water mark of this process's memory (``VmHWM``), not
``ru_maxrss``: Linux carries ``ru_maxrss`` over fork and exec, so a child started by a large
parent (a test runner holding models) would report the parent's peak.
"""

from __future__ import annotations

import argparse
import json
import resource
import sys


def _peak_mib() -> float:
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024  # kB
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # not Linux: KiB on most systems


def _main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lambda_split._gguf_rss")
    parser.add_argument("model")
    parser.add_argument("split")
    parser.add_argument("parts", help="comma-separated: head,tail or trunk")
    parser.add_argument("--whole-file", action="store_true", help="transformers' whole-file dequantisation")
    args = parser.parse_args(argv)

    import torch

    from lambda_split._models import _whole_file_gguf, resolve
    from lambda_split._parts import SplitSpec, load_parts

    torch.set_num_threads(1)
    checkpoint = resolve(args.model)
    if args.whole_file:
        checkpoint = _whole_file_gguf(checkpoint)
    spec = SplitSpec.parse(args.split, int(checkpoint.config.num_hidden_layers))
    before = _peak_mib()
    model = load_parts(checkpoint, spec, args.parts.split(","))
    loaded = [part for part in ("head", "trunk", "tail") if getattr(model, part) is not None]
    storages = {
        tensor.untyped_storage().data_ptr(): tensor.untyped_storage().nbytes()
        for part in loaded
        for tensor in getattr(model, part).parameters()
    }  # a tied head shares the embedding's storage: counted once
    result = {
        "model": checkpoint.name,
        "split": str(spec),
        "parts": loaded,
        "loader": "whole-file" if args.whole_file else "per-part",
        "peak_rss_mib": round(_peak_mib(), 1),
        "peak_rss_before_loading_mib": round(before, 1),
        "weights_kept_mib": round(sum(storages.values()) / 2**20, 1),
    }
    json.dump(result, sys.stdout)
    print()
    return 0


if __name__ == "__main__":
    raise SystemExit(_main())
