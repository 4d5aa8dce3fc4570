"""What asking transformers' mask builder on every decode step costs a part, in this process.

    OMP_NUM_THREADS=1 python benchmarks/step_mask.py [--model smollm2-135m] [--rounds 20] [--steps 60]

The head of ``2:-2`` (embeddings and two layers) runs one-token decode steps after a 40-token
prompt. In alternating rounds it either keeps transformers' answer that such a step needs no mask
(what the parts do since that answer is remembered) or forgets it before every step, so the builder
runs each time (what they did before). Prints the median step time of each and the difference:
what every part (head, trunk, tail) saves per token.
"""

from __future__ import annotations

import argparse
import statistics
import time


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--steps", type=int, default=60)
    args = parser.parse_args()

    import torch

    from lambda_split._models import resolve
    from lambda_split._parts import SplitSpec, load_parts

    torch.set_num_threads(1)
    checkpoint = resolve(args.model)
    spec = SplitSpec.parse("2:-2", int(checkpoint.config.num_hidden_layers))
    head = load_parts(checkpoint, spec, ("head",)).head
    assert head is not None
    prompt = torch.randint(0, 1000, (1, 40))
    token, one = torch.tensor([[5]]), torch.ones(1, 1, dtype=torch.long)
    times: dict[bool, list[float]] = {True: [], False: []}
    with torch.inference_mode():
        for _ in range(args.rounds):
            for remembered in (True, False):
                state = head.new_state()
                head(prompt, torch.ones_like(prompt), state)
                for _ in range(args.steps):
                    if not remembered:
                        head._maskless_steps.clear()
                    started = time.perf_counter()
                    head(token, one, state)
                    times[remembered].append(time.perf_counter() - started)
    kept, asked = (statistics.median(times[k]) * 1e3 for k in (True, False))
    print(f"{args.model} head, one-token steps, median of {args.rounds * args.steps} each:")
    print(f"  builder asked every step  {asked:.3f} ms")
    print(f"  answer remembered         {kept:.3f} ms")
    print(f"  saved per part and token  {asked - kept:.3f} ms")


if __name__ == "__main__":
    main()
