"""What stop-aware prompt reading costs against reading the prompt as one graph.

`Forward.prefill` reads a prompt in chunks sized from the measured speed, asking `stop()`
between them (or between layers, when a chunk would be slow), so Esc or Ctrl+C lands within
`PREFILL_BUDGET_S`. One graph cannot be stopped; it is the speed to match.

    python -m benchmarks.chunking                       # narrow and 0.5B BF16 shapes
    python -m benchmarks.chunking --model narrow-bf16 --tokens 512

Both ways run in one process after a warm-up, alternating, best of `--repeats`.
"""

from __future__ import annotations

import argparse
import sys
import time

from .models import MODELS, ensure

DEFAULTS = {"narrow-bf16": 512, "0.5B-bf16": 128}


def timings(path: str, tokens: int, repeats: int) -> dict[str, list[float]]:
    import mlx.core as mx

    from apertus_mlx.forward import Forward
    from apertus_mlx.loading import load_model

    model = load_model(path)
    ids = [(7 * i) % 1000 + 100 for i in range(tokens)]

    def chunked() -> None:
        forward, cache = Forward(model), model.make_cache()  # speed learned afresh each time
        mx.eval(forward.prefill(ids, cache))

    def whole() -> None:
        cache = model.make_cache()
        hidden = cache.run(model.model, mx.array([ids]))
        mx.eval(model.logits(hidden[:, -1, :]), cache.arrays())

    runs: dict[str, list[float]] = {"one graph": [], "chunked": []}
    whole(), chunked()  # warm-up
    for _ in range(repeats):
        for name, fn in (("one graph", whole), ("chunked", chunked)):
            start = time.perf_counter()
            fn()
            runs[name].append(time.perf_counter() - start)
    return runs


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.chunking")
    parser.add_argument("--model", action="append", choices=[m.name for m in MODELS])
    parser.add_argument("--tokens", type=int, help="prompt tokens [default: per model]")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args(argv)
    print(f"\nstop-aware prompt reading against one graph (best of {args.repeats}, alternating)")
    for name in args.model or list(DEFAULTS):
        tokens = args.tokens or DEFAULTS.get(name, 256)
        path = str(ensure(next(m for m in MODELS if m.name == name)))
        runs = timings(path, tokens, args.repeats)
        one, chunked = min(runs["one graph"]), min(runs["chunked"])
        spread = max((max(r) - min(r)) / min(r) for r in runs.values())
        print(
            f"{name} ({tokens} tokens): one graph {tokens / one:.1f} tok/s, chunked "
            f"{tokens / chunked:.1f} tok/s, cost {100 * (chunked / one - 1):+.1f}% "
            f"(runs up to {100 * spread:.0f}% apart)"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
