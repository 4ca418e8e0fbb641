"""One model across 1, 2 and 3 local processes: what the pipeline's ring costs per token, and
tensor parallel (`tensor_parallel.shard`, heads split across 2 ranks) on the same model.

    python -m benchmarks.distributed            # narrow and 0.5B shapes, 1-3 ranks
    python -m benchmarks.distributed --quick    # narrow only, fewer tokens

Each row starts the ranks as `--hostfile` does (local processes on 127.0.0.1, MLX's ring
backend over TCP) and times the token layer on rank 0: time to first token after a prompt of
random ids, then greedy decoding. The same layers are computed whatever the number of ranks;
what more ranks add per token is one trip round the ring (a header, the hidden state from rank
to rank, the token back) and each rank's Python step, so the narrow shape, whose layers cost
almost nothing, shows that cost nearly alone: `ring ms/token` = 1 / decode tok/s with k ranks
minus 1 / decode tok/s with one.

On a Mac each waiting rank's MLX receive polls its socket on a core of its own; on a CPU with
few cores shared by every rank (as in CI) that polling competes with the computing rank, so
the numbers there are an upper bound of the ring's cost, not what a Thunderbolt link costs.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from .models import MODELS, ensure

ROWS = {  # shape row of benchmarks/models.py -> (prompt tokens, generated tokens)
    "narrow-bf16": (64, 48),
    "0.5B-bf16": (16, 8),
}
QUICK = {"narrow-bf16": (16, 12)}
TENSOR = {"0.5B-bf16": 2}  # the narrow shape's single kv head does not divide
RANKS = (1, 2, 3)
REPEATS = 2


def measure(path: Path, prompt: int, gen: int, repeats: int, hostfile: str | None) -> dict:
    """In the rank-0 process: best time to first token and decode speed over `repeats` runs.
    `hostfile` "tensor": every rank runs this, its slice of every layer (under mlx.launch)."""
    import mlx.core as mx
    import numpy as np

    from apertus_mlx import distributed
    from apertus_mlx.generate import Forward, PromptProgress, generate_step
    from apertus_mlx.loading import load_model
    from apertus_mlx.sampling import SamplingParams, make_sampler

    pipeline = None
    if hostfile == "tensor":
        model = load_model(path, tensor_group=mx.distributed.init(strict=True))
    else:
        distributed.start(hostfile)
        pipeline = distributed.active()
        model = pipeline.load(str(path), path) if pipeline else load_model(path)
    ids = np.random.default_rng(0).integers(0, model.args.vocab_size, prompt).tolist()
    forward = Forward(model)
    greedy = SamplingParams(temperature=0)

    def steps(cache):
        if pipeline is None:
            return generate_step(ids, forward, cache, sampler=make_sampler(greedy), max_tokens=gen)
        return pipeline.generate_step(ids, forward, cache, params=greedy, max_tokens=gen,
                                      stop=lambda: False, progress=PromptProgress())  # fmt: skip

    best = {"ttft_s": float("inf"), "decode_tps": 0.0}
    for run in range(repeats + 1):  # the first compiles and sizes the prompt chunks
        cache = model.make_cache()
        start = time.perf_counter()
        it = steps(cache)
        next(it)
        first = time.perf_counter()
        n = 1 + sum(1 for _ in it)
        end = time.perf_counter()
        if run:
            best["ttft_s"] = min(best["ttft_s"], first - start)
            best["decode_tps"] = max(best["decode_tps"], (n - 1) / max(end - first, 1e-9))
    best["prefill_tps"] = prompt / best["ttft_s"]
    best["peak_memory_gb"] = mx.get_peak_memory() / 1e9
    return best


def run_row(
    name: str, prompt: int, gen: int, ranks: int, repeats: int, tensor: bool = False
) -> dict:
    """One measurement in fresh processes (MLX's distributed group is one per process)."""
    path = ensure(next(m for m in MODELS if m.name == name))
    command = [sys.executable, "-m", "benchmarks.distributed", "--measure", str(path),
               str(prompt), str(gen), str(repeats)]  # fmt: skip
    if tensor:  # every rank runs the measurement: started by mlx.launch
        launch = Path(sys.executable).parent / "mlx.launch"
        command = [str(launch), "--backend", "ring", "-n", str(ranks), "--hosts", "127.0.0.1",
                   "--", *command, "tensor"]  # fmt: skip
    with tempfile.TemporaryDirectory() as tmp:
        if ranks > 1 and not tensor:
            hostfile = Path(tmp) / "hosts.json"
            hostfile.write_text(json.dumps([{"ssh": "127.0.0.1"}] * ranks))
            command.append(str(hostfile))
        root = Path(__file__).resolve().parent.parent
        env = {**os.environ, "PYTHONPATH": str(root)}
        out = subprocess.run(command, capture_output=True, text=True, env=env, timeout=1800)
    if out.returncode != 0:
        raise SystemExit(f"{name} on {ranks} ranks failed:\n{out.stderr[-2000:]}")
    return json.loads(out.stdout.splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.distributed")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--measure", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.measure:  # rank 0 of one row
        path, prompt, gen, repeats, *hostfile = args.measure
        result = measure(Path(path), int(prompt), int(gen), int(repeats), (hostfile or [None])[0])
        print(json.dumps(result), flush=True)
        return 0

    rows = QUICK if args.quick else ROWS
    repeats = 1 if args.quick else REPEATS
    print(f"\npipeline across local processes (ring backend over TCP), {os.cpu_count()} cores")
    print(f"{'model':<13} {'ranks':>5} {'prompt/gen':>10} {'ttft s':>8} {'prefill tok/s':>14} "
          f"{'decode tok/s':>13} {'ring ms/token':>14}")  # fmt: skip
    for name, (prompt, gen) in rows.items():
        one = None
        for ranks in RANKS:
            r = run_row(name, prompt, gen, ranks, repeats)
            one = one or r
            extra = 1000 * (1 / r["decode_tps"] - 1 / one["decode_tps"])
            ring = "-" if ranks == 1 else f"{extra:+.2f}"
            print(f"{name:<13} {ranks:>5} {f'{prompt}/{gen}':>10} {r['ttft_s']:>8.3f} "
                  f"{r['prefill_tps']:>14.1f} {r['decode_tps']:>13.1f} {ring:>14}",
                  flush=True)  # fmt: skip
    print("\nring ms/token: added per decoded token against one process (the same layers)")
    if args.quick:
        return 0
    print("\ntensor parallel (heads and MLP columns split; 2 sums per layer and token)")
    for name, ranks in TENSOR.items():
        prompt, gen = rows.get(name, ROWS[name])
        r = run_row(name, prompt, gen, ranks, repeats, tensor=True)
        print(f"{name:<13} {ranks:>5} {f'{prompt}/{gen}':>10} {r['ttft_s']:>8.3f} "
              f"{r['prefill_tps']:>14.1f} {r['decode_tps']:>13.1f}", flush=True)  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
