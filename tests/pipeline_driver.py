"""One workload, run on one process by the tests and across ranks by this script.

    python -m tests.pipeline_driver [--hostfile H] [--split 1,2,1] MODEL...

Under `mlx.launch` every rank runs it (ranks > 0 serve inside `distributed.start` and never
reach the workload); with `--hostfile` it starts the other ranks itself. Rank 0 prints one
JSON line per model: what `workload` gives, and what each rank holds (`Pipeline.ranks`).
"""

from __future__ import annotations

import argparse
import json

import mlx.core as mx

# A prompt longer than one chunk (generate.MAX_CHUNK = 512): chunks go through the ranks.
LONG_PROMPT = [(i * 37 + 11) % 1000 + 3 for i in range(600)]
PROMPT = LONG_PROMPT[:40]


def workload(model, tokenizer) -> dict:
    """Greedy, seeded sampling with every truncation and the repetition penalty, a second turn
    reusing the first turn's cache, a long prompt, a quantized KV cache, and plain logits."""
    from apertus_mlx.generate import Done, generate
    from apertus_mlx.sampling import SamplingParams

    def tokens(ids, params, n, cache=None) -> list[int]:
        events = generate(model, tokenizer, ids, params=params, max_tokens=n, cache=cache)
        return [e for e in events if isinstance(e, Done)][0].tokens

    greedy = SamplingParams(temperature=0)
    seeded = SamplingParams(temperature=0.9, top_p=0.9, top_k=50, repetition_penalty=1.3, seed=7)
    out = {"greedy": tokens(PROMPT, greedy, 12), "seeded": tokens(PROMPT, seeded, 12)}
    cache = model.make_cache()
    first = tokens(PROMPT, seeded, 6, cache)
    follow_up = PROMPT + first + [5, 6, 7]
    cache.keep_prefix(follow_up)
    out["chat"] = [first, tokens(follow_up, seeded, 6, cache)]
    out["long"] = tokens(LONG_PROMPT, greedy, 4)
    out["kv8"] = tokens(PROMPT, greedy, 6, model.make_cache(bits=8))
    out["logits"] = model(mx.array([PROMPT[:12]])).astype(mx.float32).tolist()
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--hostfile")
    parser.add_argument("--split")
    parser.add_argument("--dtype")
    parser.add_argument("models", nargs="+")
    args = parser.parse_args()

    from apertus_mlx import distributed, load

    distributed.start(args.hostfile, args.split)
    for path in args.models:
        model, tokenizer = load(path, dtype=args.dtype)
        loaded = model.pipeline.ranks()  # memory peaks since the load began: the load's
        result = workload(model, tokenizer)
        result["ranks"], result["loaded"] = model.pipeline.ranks(), loaded
        result["describe"] = model.pipeline.describe()
        print(json.dumps(result), flush=True)
        del model  # before the next load, as every other rank drops its part


if __name__ == "__main__":
    main()
