"""`make bench` (`python -m benchmarks`): apertus-mlx beside mlx-lm on the model-card shapes.

Builds random-weight checkpoints once under `.bench-cache/`, runs `apertus_mlx.bench.run` with
mlx-lm on each, prints one table and writes it, with per-primitive op counts and the machine,
to `.bench-cache/results.json`.

    python -m benchmarks                 # everything below (about 13 minutes on 2 CPU cores)
    python -m benchmarks --models        # the model table only (about 9 minutes)
    python -m benchmarks --quick         # the model table, fewer tokens, one run each
    python -m benchmarks --only 0.5B-int4 --only narrow-bf16
    python -m benchmarks --turns         # follow-up turns: cache reuse (benchmarks/turns.py)
    python -m benchmarks --filter        # the output filter's cost (benchmarks/filter_bench.py)
    python -m benchmarks --speculative   # speculative decoding (benchmarks/speculative.py)
    python -m benchmarks --kv            # a quantized KV cache's fidelity (benchmarks/kv.py)
    python -m benchmarks --grammar       # constrained output's cost (benchmarks/grammar.py)
    python -m benchmarks --kernels       # our Metal kernels vs MLX's (benchmarks/kernels.py)
    python -m benchmarks --distributed   # 1, 2 and 3 local ranks (benchmarks/distributed.py)
    python -m benchmarks --chunking      # stop-aware prompt reading vs one graph
    python -m benchmarks --ui            # the chat UI's worst stall while streaming (ui_stall.py)
    python -m benchmarks --serve         # the HTTP server under load (benchmarks/serve.py)
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from importlib.metadata import version
from pathlib import Path

from apertus_mlx.bench import format_table, run

from .models import CACHE, MODELS, ensure


def machine() -> dict:
    """What the numbers were measured on."""
    import mlx.core as mx

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "cpu": cpu,
        "nproc": os.cpu_count(),
        "platform": platform.platform(),
        "device": str(mx.default_device()),
        "mlx": version("mlx"),
        "mlx_lm": version("mlx-lm"),
    }


def main(argv: list[str] | None = None) -> int:
    names = [m.name for m in MODELS]
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--only", action="append", choices=names, help="Run only this model.")
    parser.add_argument("--quick", action="store_true", help="Fewer tokens, one run each.")
    parser.add_argument("--repeats", type=int, help="Runs per engine [default: 2, 1 with --quick].")
    sections = (
        "models",
        "turns",
        "filter",
        "speculative",
        "kv",
        "grammar",
        "kernels",
        "distributed",
        "chunking",
        "ui",
        "serve",
    )
    for name in sections:
        parser.add_argument(f"--{name}", action="store_true", help=f"Run the {name} section.")
    args = parser.parse_args(argv)
    chosen = [name for name in sections if getattr(args, name)]
    if (args.only or args.quick) and not chosen:  # `--distributed --quick`: that one, quick
        chosen.append("models")
    for name in chosen or sections:
        if name != "models":
            print(f"\n== {name}", flush=True)
        SECTIONS[name](args)
    return 0


def models_table(args: argparse.Namespace) -> None:
    repeats = args.repeats or (1 if args.quick else 2)

    started = time.perf_counter()
    info = machine()
    print(
        f"{info['cpu']}, {info['nproc']} cores, {info['device']}, mlx {info['mlx']}, "
        f"mlx-lm {info['mlx_lm']}",
        file=sys.stderr,
    )
    table, record = {}, {}
    for m in MODELS:
        if args.only and m.name not in args.only:
            continue
        prompt, gen = m.quick if args.quick else (m.prompt_tokens, m.gen_tokens)
        print(f"== {m.name}: {prompt} prompt tokens, {gen} generated", file=sys.stderr)
        path = ensure(m)
        results = run(
            path,
            prompt,
            gen,
            repeats=repeats,
            vs_mlx_lm=True,
            progress=lambda line: print("   " + line, file=sys.stderr, flush=True),
        )
        table[f"{m.name} ({prompt}/{gen})"] = results
        record[m.name] = {
            "prompt_tokens": prompt,
            "gen_tokens": gen,
            **{name: r.as_dict(detailed=True) for name, r in results.items()},
        }
    wall = time.perf_counter() - started

    print(
        f"\nbest of {repeats} runs; (prompt/generated tokens); {info['cpu']}, "
        f"{info['nproc']} cores, {info['device']}"
    )
    print(format_table(table))
    print(f"\nwall time {wall:.0f} s; per-primitive op counts in {CACHE / 'results.json'}")
    CACHE.mkdir(exist_ok=True)
    out = {"machine": info, "repeats": repeats, "wall_s": round(wall, 1), "models": record}
    (CACHE / "results.json").write_text(json.dumps(out, indent=2))


def _turns(args: argparse.Namespace) -> None:
    from .turns import main as turns

    turns([])


def _filter(args: argparse.Namespace) -> None:
    from .filter_bench import main as filter_bench

    filter_bench([])


def _speculative(args: argparse.Namespace) -> None:
    from .speculative import main as speculative

    speculative([])


def _kv(args: argparse.Namespace) -> None:
    from .kv import main as kv

    kv([])


def _grammar(args: argparse.Namespace) -> None:
    from .grammar import main as grammar

    grammar([])


def _kernels(args: argparse.Namespace) -> None:
    from .kernels import main as kernels

    kernels([])


def _distributed(args: argparse.Namespace) -> None:
    from .distributed import main as distributed

    distributed(["--quick"] if args.quick else [])


def _chunking(args: argparse.Namespace) -> None:
    from .chunking import main as chunking

    chunking(["--repeats", "2"] if args.quick else [])


def _ui(args: argparse.Namespace) -> None:
    from .ui_stall import main as ui_stall

    quick = ["--answers", "1"] if args.quick else []
    ui_stall(quick)  # a first start: an empty history
    ui_stall([*quick, "--history", "200"])  # a long-time user's sidebar


def _serve(args: argparse.Namespace) -> None:
    from .serve import main as serve

    serve([])


SECTIONS = {
    "chunking": _chunking,
    "distributed": _distributed,
    "kernels": _kernels,
    "kv": _kv,
    "grammar": _grammar,
    "models": models_table,
    "turns": _turns,
    "filter": _filter,
    "speculative": _speculative,
    "ui": _ui,
    "serve": _serve,
}


if __name__ == "__main__":
    sys.exit(main())
