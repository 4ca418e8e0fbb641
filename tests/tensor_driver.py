"""One workload on a model split by heads across the ranks (`tensor_parallel.shard`).

    mlx.launch --backend ring -n 2 --hosts 127.0.0.1 -- python -m tests.tensor_driver OUT MODEL...

Every rank runs it whole (tensor parallel has no rank 0 driving the others) and writes
OUT/rank-R.json: per model, greedy and seeded tokens and the prompt's logits.
"""

from __future__ import annotations

import gc
import json
import sys
from pathlib import Path

import mlx.core as mx
from mlx.utils import tree_flatten

from tests.pipeline_driver import PROMPT


def workload(model, tokenizer) -> dict:
    from apertus_mlx.generate import Done, generate
    from apertus_mlx.sampling import SamplingParams

    def tokens(params, n) -> list[int]:
        events = generate(model, tokenizer, PROMPT, params=params, max_tokens=n)
        return [e for e in events if isinstance(e, Done)][0].tokens

    return {
        "greedy": tokens(SamplingParams(temperature=0), 12),
        "seeded": tokens(SamplingParams(temperature=0.9, top_p=0.9, seed=7), 12),
        "unseeded": tokens(SamplingParams(temperature=1.0), 12),  # alike on every rank
        "logits": model(mx.array([PROMPT[:12]])).astype(mx.float32).tolist(),
    }


def main() -> None:
    from apertus_mlx import load

    group = mx.distributed.init(strict=True)
    out, results = Path(sys.argv[1]), []
    for path in sys.argv[2:]:
        mx.reset_peak_memory()
        model, tokenizer = load(path, tensor_group=group)
        held = sum(a.nbytes for _, a in tree_flatten(model.parameters()))
        loading = {"parameter_bytes": held, "peak_memory": mx.get_peak_memory()}
        results.append({**workload(model, tokenizer), **loading})
        del model
        gc.collect()  # the next model's peak is its own
        mx.clear_cache()
    (out / f"rank-{group.rank()}.json").write_text(json.dumps(results))


if __name__ == "__main__":
    main()
