"""`make bench ARGS=--kernels`: our quantized Metal kernels against MLX's path, on a Mac.

Per model shape (0.5B, 1.5B, 4B, 8B, 70B) and width (3, 4, 6 bits, groups of 64), the
microseconds one decoding step (one token, bfloat16) spends in each projection, ours against
MLX's: q/k/v with QK-norm + RoPE, o, up with xIELU, down, and the head; then the decode speed
of the random-weight 0.5B and 1.5B checkpoints of `make bench` with the kernels and without
(`APERTUS_MLX_NO_METAL_KERNELS=1`'s plan). Timing is `kernels.metal.time_both`, the same
measurement that decides at run time whether a kernel is used.

Without a Metal GPU (Linux, or MLX on the CPU) it says so and does nothing: custom Metal
kernels cannot run there, and no number is made up for them.

    python -m benchmarks.kernels [--shapes 0.5B --shapes 8B] [--bits 4] [--no-decode]
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass

import mlx.core as mx


@dataclass(frozen=True)
class LayerShape:
    hidden: int
    mlp: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int = 131072


# 0.5B and 1.5B as in benchmarks/models.py; 8B from its config.json; 70B: hidden 8192,
# MLP 43008, 64 heads of 128, 8 KV heads (the Apertus 1.5 70B text tower, said to be the same
# architecture). 4B: no config was at hand; 24 heads of 128 with 8 KV heads and MLP 16384 fit
# its 3.83B parameters and 98304 fp16 KV bytes per token. Treat the 4B row as an estimate.
SHAPES = {
    "0.5B": LayerShape(1024, 6144, 16, 4, 64),
    "1.5B": LayerShape(2048, 12288, 32, 8, 64),
    "4B": LayerShape(3072, 16384, 24, 8, 128),
    "8B": LayerShape(4096, 21504, 32, 8, 128),
    "70B": LayerShape(8192, 43008, 64, 8, 128),
}
BITS = (3, 4, 6)
GROUP = 64
DECODE_TOKENS = 64


def metal_absent() -> str | None:
    """Why the kernels cannot run here, or None on a Mac."""
    from apertus_mlx.plan import metal_gpu

    if not metal_gpu():
        return "Metal is absent (MLX computes on the CPU here): nothing to time."
    return None


def _layer(out_dims: int, in_dims: int, bits: int, seed: int) -> tuple[mx.array, ...]:
    """Random packed weights (every bit pattern), bfloat16 scales and biases."""
    keys = mx.random.split(mx.random.key(seed), 4)
    shape = (out_dims, in_dims * bits // 32)
    high, low = (mx.random.randint(0, 1 << 16, shape, mx.uint32, key=k) for k in keys[:2])
    groups = (out_dims, in_dims // GROUP)
    scales = mx.random.uniform(-0.01, 0.01, groups, key=keys[2]).astype(mx.bfloat16)
    biases = mx.random.uniform(-0.1, 0.1, groups, key=keys[3]).astype(mx.bfloat16)
    arrays = ((high << 16) | low, scales, biases)
    mx.eval(arrays)
    return arrays


def projections(shape: LayerShape, bits: int, plan) -> list[tuple[str, object, object]]:
    """(name, ours, mlx) per projection of one decoding step; thunks on random inputs."""
    from apertus_mlx.kernels import fast_norm_rope, qmv, xielu

    dtype = mx.bfloat16
    x = mx.random.normal((1, 1, shape.hidden), key=mx.random.key(1)).astype(dtype)
    h = mx.random.normal((1, 1, shape.mlp), key=mx.random.key(2)).astype(dtype)
    o_in = mx.random.normal((1, 1, shape.heads * shape.head_dim), key=mx.random.key(3)).astype(
        dtype
    )
    q_size, kv_size = shape.heads * shape.head_dim, shape.kv_heads * shape.head_dim
    qkv = _layer(q_size + 2 * kv_size, shape.hidden, bits, 0)
    o = _layer(shape.hidden, q_size, bits, 1)
    up = _layer(shape.mlp, shape.hidden, bits, 2)
    down = _layer(shape.hidden, shape.mlp, bits, 3)
    head = _layer(shape.vocab, shape.hidden, bits, 4)
    q_norm, k_norm, inv_freq = qmv.probe_norms(shape.head_dim, dtype)
    wavelengths = 1.0 / inv_freq
    consts = tuple(mx.array(c, dtype=mx.float32) for c in qmv.XIELU_CONSTANTS)
    offset, heads = 1000, (shape.heads, shape.kv_heads)

    def mlx_qkv():
        y = mx.quantized_matmul(x, *qkv, True, GROUP, bits).reshape(1, 1, -1, shape.head_dim)
        q, k = y[:, :, : shape.heads], y[:, :, shape.heads : shape.heads + shape.kv_heads]
        v = y[:, :, shape.heads + shape.kv_heads :]
        rotate = {"offset": offset, "inv_freq": inv_freq, "wavelengths": wavelengths, "plan": plan}
        q = fast_norm_rope(q, q_norm, 1e-5, **rotate)
        k = fast_norm_rope(k, k_norm, 1e-5, **rotate)
        return q, k, v.transpose(0, 2, 1, 3)

    def ours_qkv():
        args = (q_norm, k_norm, 1e-5, offset, inv_freq, *heads)
        return qmv.qkv_norm_rope_metal(x, *qkv, bits, GROUP, *args)

    def matmul(inputs, layer):
        return (
            lambda: qmv.qmv_metal(inputs, *layer, bits, GROUP),
            lambda: mx.quantized_matmul(inputs, *layer, True, GROUP, bits),
        )

    return [
        ("qkv+norm+rope", ours_qkv, mlx_qkv),
        ("o", *matmul(o_in, o)),
        (
            "up+xielu",
            lambda: qmv.qmv_xielu_metal(x, *up, bits, GROUP, consts),
            lambda: xielu(mx.quantized_matmul(x, *up, True, GROUP, bits), *consts, plan),
        ),
        ("down", *matmul(h, down)),
        ("head", *matmul(x, head)),
    ]


def kernel_table(names: list[str], widths: list[int]) -> None:
    from apertus_mlx.kernels import metal, qmv
    from apertus_mlx.plan import make_plan

    plan = make_plan(mx.bfloat16)
    print(f"{'model':6} {'bits':>4} {'projection':14} {'ours us':>9} {'mlx us':>9} {'speed-up':>8}")
    for name in names:
        shape = SHAPES[name]
        for bits in widths:
            checks = {
                "qkv+norm+rope": qmv.QKV_ROPE.usable(
                    mx.bfloat16, mx.bfloat16, bits, GROUP, 1, shape.head_dim, shape.heads,
                    shape.kv_heads,
                ),
                "up+xielu": qmv.QMV_XIELU.usable(mx.bfloat16, mx.bfloat16, bits, GROUP, 1),
            }  # fmt: skip
            plain = qmv.QMV.usable(mx.bfloat16, mx.bfloat16, bits, GROUP, 1)
            layer_ours = layer_mlx = 0.0
            for projection, ours, theirs in projections(shape, bits, plan):
                if not checks.get(projection, plain):
                    print(f"{name:6} {bits:4} {projection:14} failed its self-check")
                    continue
                ours_s, theirs_s = metal.time_both(ours, theirs)
                if projection != "head":
                    layer_ours, layer_mlx = layer_ours + ours_s, layer_mlx + theirs_s
                print(
                    f"{name:6} {bits:4} {projection:14} {ours_s * 1e6:9.1f} {theirs_s * 1e6:9.1f} "
                    f"{theirs_s / ours_s:7.2f}x",
                    flush=True,
                )
            if layer_ours:
                print(
                    f"{name:6} {bits:4} {'layer total':14} {layer_ours * 1e6:9.1f} "
                    f"{layer_mlx * 1e6:9.1f} {layer_mlx / layer_ours:7.2f}x"
                )
            mx.clear_cache()


def decode_tps(path, metal_kernels: bool, tokens: int = DECODE_TOKENS) -> tuple[float, str]:
    """Greedy decoding tokens/s (first token to last) and the plan's one-line description."""
    import time

    from apertus_mlx.bench import random_prompt, unload, vocab_size
    from apertus_mlx.generate import Forward, generate_step
    from apertus_mlx.loading import load_model
    from apertus_mlx.sampling import SamplingParams, make_sampler

    forward = Forward(load_model(path, metal_kernels=metal_kernels))
    prompt = random_prompt(16, vocab_size(path))
    best = 0.0
    for _ in range(2):
        steps = generate_step(
            prompt,
            forward,
            forward.model.make_cache(),
            sampler=make_sampler(SamplingParams(temperature=0)),
            max_tokens=tokens,
        )
        first = end = time.perf_counter()
        for n, _ in enumerate(steps, 1):
            if n == 1:
                first = time.perf_counter()
            end = time.perf_counter()
        best = max(best, (tokens - 1) / max(end - first, 1e-9))
    described = forward.model.plan.describe()
    del forward
    unload()
    return best, described


def decode_table(names: list[str], widths: list[int]) -> None:
    from .models import BenchModel, ensure

    print(f"\n{'checkpoint':12} {'with kernels':>13} {'without':>9}  (decode tok/s, greedy)")
    for name in names:
        if name not in ("0.5B", "1.5B"):
            continue  # only these shapes have random-weight checkpoints (benchmarks/models.py)
        for bits in widths:
            path = ensure(BenchModel(f"{name}-int{bits}", name, bits, 16, DECODE_TOKENS, (8, 8)))
            with_tps, described = decode_tps(path, metal_kernels=True)
            without_tps, _ = decode_tps(path, metal_kernels=False)
            print(f"{name + f'-int{bits}':12} {with_tps:13.1f} {without_tps:9.1f}")
            print(f"   {described}", flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.kernels", description=__doc__)
    parser.add_argument("--shapes", action="append", choices=list(SHAPES))
    parser.add_argument("--bits", action="append", type=int, choices=BITS)
    parser.add_argument("--no-decode", action="store_true", help="Only the per-kernel table.")
    args = parser.parse_args(argv)
    absent = metal_absent()
    if absent is not None:
        print(absent)
        return 0
    names, widths = args.shapes or list(SHAPES), args.bits or list(BITS)
    kernel_table(names, widths)
    if not args.no_decode:
        decode_table(names, widths)
    return 0


if __name__ == "__main__":
    sys.exit(main())
