"""What a quantized KV cache costs in fidelity and saves in memory.

    python -m benchmarks.kv

The 0.5B shape (head_dim 64) reads a prompt and decodes greedily with a float32 cache; the
same tokens are then fed through caches quantized to 8 and 4 bits, and every position's
next-token distribution is compared with the float cache's: mean KL divergence and top-1
agreement. Random weights give near-uniform distributions, so these figures bound the
arithmetic error, not a real model's loss.
"""

from __future__ import annotations

import sys

import mlx.core as mx
import numpy as np

from .models import MODELS, ensure

PROMPT, DECODE = 48, 16


def logits_through(model, ids: list[int], bits: int | None) -> tuple[np.ndarray, int]:
    """Next-token log-probabilities at every position after the prompt, and the cache bytes."""
    cache = model.make_cache(bits=bits)
    rows = [model(mx.array([ids[:PROMPT]]), cache=cache)[0, -1:]]
    for t in ids[PROMPT:]:
        rows.append(model(mx.array([[t]]), cache=cache)[0, -1:])
    out = mx.concatenate(rows).astype(mx.float32)
    out = out - mx.logsumexp(out, axis=-1, keepdims=True)
    used = sum(a[..., : cache.offset, :].nbytes for a in cache.arrays())
    return np.array(out), used


def main(argv: list[str] | None = None) -> int:
    from apertus_mlx.loading import load_model

    model = load_model(ensure(next(m for m in MODELS if m.name == "0.5B-bf16")))
    rng = np.random.default_rng(0)
    ids = rng.integers(0, model.args.vocab_size, PROMPT).tolist()
    cache = model.make_cache()
    logits = model(mx.array([ids]), cache=cache)
    for _ in range(DECODE):  # a greedy continuation, so decoded positions are realistic
        ids.append(int(mx.argmax(logits[0, -1]).item()))
        logits = model(mx.array([ids[-1:]]), cache=cache)
    reference, full = logits_through(model, ids, None)
    print(f"\nKV cache quantization, 0.5B shape, {PROMPT} prompt + {DECODE} decoded tokens")
    print(f"{'bits':>6} {'mean KL':>10} {'top-1':>7} {'memory':>8}")
    print(f"{'float':>6} {0.0:>10.2e} {'100.0%':>7} {'1.00x':>8}")
    for bits in (8, 4):
        got, used = logits_through(model, ids, bits)
        p = np.exp(reference)
        kl = float(np.mean(np.sum(p * (reference - got), axis=-1)))
        top1 = float(np.mean(reference.argmax(-1) == got.argmax(-1)))
        print(f"{bits:>6} {kl:>10.2e} {top1:>7.1%} {used / full:>7.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
