"""A small model and a smaller draft trained here on the same text, for an acceptance rate
between the random ends of `benchmarks.speculative`: byte-level (vocabulary 256) models on
the Python standard library's own source, trained with MLX from a fixed seed in a few CPU
minutes, written as Apertus checkpoints under `.bench-cache/`.

A few minutes of a 2-core CPU buy 100 steps: both end near 2.8 nats per byte (byte
frequencies and a little context), the one-layer draft no worse than the four-layer model,
so the two agree far more than a real small/large pair would. Raise STEPS where compute
allows; the rest stays the same.

    python -m benchmarks.trained    # trains once (cached), then times as benchmarks.speculative
"""

from __future__ import annotations

import json
import shutil
import sys
import sysconfig
import time
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np
from mlx.utils import tree_flatten

from .models import CACHE, Shape, config_for, random_weights

TARGET = Shape(4, 128, 512, 4, 2, 256, tied=True)
DRAFT = Shape(1, 64, 256, 2, 1, 256, tied=True)
STEPS, BATCH, LENGTH, LR = 100, 16, 128, 5e-3
SEED = 0
PROMPT, GEN_TOKENS = 64, 64


def corpus(limit: int = 4_000_000) -> np.ndarray:
    """The standard library's top-level modules, in name order, as bytes."""
    files = sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py"))
    data = b"".join(f.read_bytes() for f in files)[:limit]
    return np.frombuffer(data, dtype=np.uint8).astype(np.int32)


def train(name: str, shape: Shape, data: np.ndarray, log=print) -> Path:
    """Train `shape` from random weights on `data`; the checkpoint directory (cached)."""
    from apertus_mlx.loading import load_model

    out = CACHE / f"trained-{name}"
    if (out / "config.json").is_file():
        return out
    tmp = CACHE / f"trained-{name}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    mx.save_safetensors(str(tmp / "model.safetensors"), random_weights(shape, seed=SEED))
    (tmp / "config.json").write_text(json.dumps(config_for(shape), indent=2))
    model = load_model(tmp, dtype="float32", fuse=False)
    for layer in model.layers:
        layer.mlp.act_fn.freeze(keys=["beta", "eps"])

    def loss(model, x, y):
        return nn.losses.cross_entropy(model(x), y, reduction="mean")

    step = nn.value_and_grad(model, loss)
    opt = optim.AdamW(learning_rate=optim.cosine_decay(LR, STEPS), weight_decay=0.0)
    rng = np.random.default_rng(SEED)
    start = time.perf_counter()
    for i in range(STEPS):
        at = rng.integers(0, len(data) - LENGTH - 1, size=BATCH)
        batch = np.stack([data[a : a + LENGTH + 1] for a in at])
        value, grads = step(model, mx.array(batch[:, :-1]), mx.array(batch[:, 1:]))
        opt.update(model, grads)
        mx.eval(model.parameters(), opt.state, value)
        if i % 10 == 0 or i == STEPS - 1:
            log(
                f"   {name} step {i + 1}/{STEPS}: loss {value.item():.3f} "
                f"({time.perf_counter() - start:.0f} s)"
            )
    weights = dict(tree_flatten(model.parameters()))
    mx.save_safetensors(str(tmp / "model.safetensors"), weights, metadata={"format": "pt"})
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    return out


def sampled_acceptance(model, draft_model, prompt: list[int], tokens: int, k: int) -> float:
    """Acceptance with the model card's sampling (temperature 0.8, top-p 0.9), seeded."""
    from apertus_mlx.generate import Forward
    from apertus_mlx.sampling import SamplingParams
    from apertus_mlx.speculative import Draft, DraftCounts, speculative_generate_step

    counts = DraftCounts()
    steps = speculative_generate_step(
        prompt,
        Forward(model),
        model.make_cache(),
        Draft(draft_model, k),
        params=SamplingParams(temperature=0.8, top_p=0.9, seed=SEED),
        max_tokens=tokens,
        counts=counts,
    )
    for _ in steps:
        pass
    return counts.accepted / max(counts.drafted, 1)


def main(argv: list[str] | None = None) -> int:
    from apertus_mlx.bench import bench_speculative
    from apertus_mlx.loading import load_model

    from .speculative import format_table

    data = corpus()
    log = lambda line: print(line, file=sys.stderr, flush=True)  # noqa: E731
    log(f"corpus: {len(data)} bytes of the standard library's source")
    model = load_model(train("target", TARGET, data, log))
    draft = load_model(train("draft", DRAFT, data, log))
    prompt = data[len(data) // 2 :][:PROMPT].tolist()  # a fixed piece of the source
    rows = []
    for k in (1, 3):
        result = bench_speculative(model, draft, prompt, GEN_TOKENS, k, repeats=1)
        rows.append((f"trained {DRAFT.layers} x {DRAFT.hidden}", result))
        log(f"   k={k}: acceptance {result.acceptance_rate:.0%}")
    sampled = {k: sampled_acceptance(model, draft, prompt, GEN_TOKENS, k) for k in (1, 3)}
    print(
        f"greedy, {PROMPT} prompt bytes, {GEN_TOKENS} generated; model {TARGET.layers} layers x "
        f"{TARGET.hidden}, draft {DRAFT.layers} x {DRAFT.hidden}, {STEPS} training steps each"
    )
    print(format_table(rows))
    print(
        "acceptance when sampling (temperature 0.8, top-p 0.9): "
        + ", ".join(f"k={k}: {a:.0%}" for k, a in sampled.items())
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
