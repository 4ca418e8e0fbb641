"""Memory while reading a long prompt, with the prefill handing each chunk's buffers back
to MLX (`mx.clear_cache()` between chunks, as mlx-lm does) and without.

    python -m benchmarks.prefill_memory                 # 0.5B BF16 shape, 1024 tokens
    python -m benchmarks.prefill_memory --tokens 256 --model narrow-bf16

Each run is its own process, so one's peak does not hide the other's.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

from .models import MODELS, ensure


def peak(path: str, tokens: int, clear: bool) -> dict:
    code = f"""
import json, resource, sys, mlx.core as mx
if not {clear}:
    mx.clear_cache = lambda: None
from apertus_mlx.forward import Forward
from apertus_mlx.loading import load_model
model = load_model({path!r})
forward, cache = Forward(model), model.make_cache()
ids = [(7 * i) % 1000 + 100 for i in range({tokens})]
mx.reset_peak_memory()
mx.eval(forward.prefill(ids, cache))
rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB
rss //= 1024 if sys.platform == "darwin" else 1  # macOS: bytes already
print(json.dumps({{"peak_gb": mx.get_peak_memory() / 1e9, "kv_gb": cache.nbytes() / 1e9,
                  "cache_gb": mx.get_cache_memory() / 1e9, "rss_gb": rss / 1e9}}))
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.prefill_memory")
    parser.add_argument("--model", default="0.5B-bf16", choices=[m.name for m in MODELS])
    parser.add_argument("--tokens", type=int, default=1024)
    args = parser.parse_args(argv)
    path = str(ensure(next(m for m in MODELS if m.name == args.model)))
    print(f"\npeak memory reading a {args.tokens}-token prompt, {args.model} (GB)")
    for clear in (True, False):
        r = peak(path, args.tokens, clear)
        label = "clear_cache between chunks" if clear else "without"
        print(
            f"{label:>28}: MLX peak {r['peak_gb']:.3f} (KV cache {r['kv_gb']:.3f}), "
            f"MLX's free-buffer cache after {r['cache_gb']:.3f}, process peak RSS {r['rss_gb']:.3f}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
