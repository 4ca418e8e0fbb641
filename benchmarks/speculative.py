"""`make bench ARGS=--speculative` (`python -m benchmarks.speculative`): speculative decoding's
speed and acceptance on random weights, at the two ends a random checkpoint can show.

- the model as its own draft: every draft is accepted, and each costs a full step of the
  model: the most speculative decoding can cost when it always guesses right;
- a small random checkpoint with another seed: it (almost) never guesses right, so every
  round pays k draft steps and one k+1-token pass for a single token.

A real draft (a small Apertus for a large one) lies between, by how often it agrees;
`python -m benchmarks.trained` measures a small pair trained here on the same text.
Checkpoints are built once under `.bench-cache/`; the table goes to stdout.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

import mlx.core as mx

from apertus_mlx.bench import SpeculativeResult, bench_speculative, random_prompt

from .models import CACHE, Shape, config_for, random_weights

# Mid-size: big enough that the matmuls, not Python, take the time; small enough for seconds.
TARGET = Shape(8, 384, 1536, 6, 2, 8192, tied=True)
DRAFT = Shape(2, 128, 512, 4, 1, 8192, tied=True)
# (label, draft checkpoint, draft tokens per round)
CASES = [
    ("itself (always agrees)", "target", 3),
    ("random small (never agrees)", "draft", 1),
    ("random small (never agrees)", "draft", 3),
]


def ensure(name: str, shape: Shape, seed: int, cache: Path = CACHE) -> Path:
    out = cache / f"speculative-{name}"
    if not (out / "config.json").is_file():
        tmp = cache / f"speculative-{name}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        weights = random_weights(shape, seed=seed)
        mx.eval(weights)
        mx.save_safetensors(str(tmp / "model.safetensors"), weights, metadata={"format": "pt"})
        (tmp / "config.json").write_text(json.dumps(config_for(shape), indent=2))
        shutil.rmtree(out, ignore_errors=True)
        tmp.rename(out)
    return out


def format_table(rows: list[tuple[str, SpeculativeResult]]) -> str:
    header = ["draft", "k", "acceptance", "tok/s without", "tok/s with", "with/without"]
    body = [
        [
            label,
            str(r.num_draft_tokens),
            f"{r.acceptance_rate:.0%}",
            f"{r.plain_tps:.1f}",
            f"{r.speculative_tps:.1f}",
            f"{r.speedup:.2f}",
        ]
        for label, r in rows
    ]
    widths = [max(len(row[c]) for row in [header, *body]) for c in range(len(header))]
    lines = [
        "  ".join([row[0].ljust(widths[0])] + [v.rjust(w) for v, w in zip(row[1:], widths[1:])])
        for row in [header, *body]
    ]
    lines.insert(1, "-" * len(lines[0]))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    from apertus_mlx.loading import load_model

    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.speculative", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--prompt-tokens", type=int, default=16)
    parser.add_argument("--gen-tokens", type=int, default=24)
    parser.add_argument("--repeats", type=int, default=1, help="Timed runs each; best counts.")
    args = parser.parse_args(argv)

    started = time.perf_counter()
    paths = {"target": ensure("target", TARGET, seed=0), "draft": ensure("draft", DRAFT, seed=1)}
    model = load_model(paths["target"])
    drafts = {"target": model, "draft": load_model(paths["draft"])}
    prompt = random_prompt(args.prompt_tokens, TARGET.vocab)
    rows = []
    for label, draft, k in CASES:
        result = bench_speculative(
            model, drafts[draft], prompt, args.gen_tokens, k, repeats=args.repeats
        )
        print(
            f"   {label}, k={k}: {result.plain_tps:.1f} -> {result.speculative_tps:.1f} tok/s, "
            f"acceptance {result.acceptance_rate:.0%}",
            file=sys.stderr,
            flush=True,
        )
        rows.append((label, result))
    print(
        f"greedy, {args.prompt_tokens} prompt tokens, {args.gen_tokens} generated, best of "
        f"{args.repeats}; model {TARGET.layers} layers x {TARGET.hidden}, draft "
        f"{DRAFT.layers} x {DRAFT.hidden}, vocabulary {TARGET.vocab}, random weights"
    )
    print(format_table(rows))
    print(f"\nwall time {time.perf_counter() - started:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
