"""Per-head RMSNorm and rotary embedding of q (or k), fused into one Metal kernel.

Apertus normalises every head of q and k (QK-norm), then rotates it (RoPE, rotate-half). With
`mx.fast` that is two kernels each for q and for k per layer; small models decoding on an
Apple GPU are bound by such launches, so this kernel does norm, rotation and the transpose to
the (B, heads, L, head_dim) layout of attention in one.

The arithmetic is the plain path's (`norm_rope`, which `model.Rotation` uses on the CPU):
normalise in float32, cast to x's dtype, scale by the weight, rotate with cos and sin of
float32 angles cast to x's dtype; every product and sum rounded to x's dtype as MLX does.

As every kernel here (`metal.SelfCheckedKernel`): used only where the plan allows our kernels,
it checks itself against `qk_norm_rope_reference` on first use per dtype and, on any failure,
logs one line and leaves the work to the `mx.fast` path for good. Its text sticks to built-ins
that the g++ stand-ins of tests/stand_in_metal.h provide. The per-pair arithmetic
(`norm_rope_pair`) also serves the fused q/k/v projection's epilogue (`qmv.py`).
"""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING, Any

import mlx.core as mx
import numpy as np

from .metal import SelfCheckedKernel

if TYPE_CHECKING:
    from ..plan import Plan

KERNEL_HEADER = """
// x rounded to the element type T and back, as MLX rounds every operation on T.
template <typename T>
inline float round_to(float x) {
    return static_cast<float>(static_cast<T>(x));
}

// One rotated pair (i, i + head_dim/2) of a head: x1, x2 its two values, w1, w2 the norm's
// weights there, inv_rms the head's, angle = position * inv_freq[i]. As the plain path: cast
// the normalised value to T, scale, rotate; every product and sum rounded to T.
template <typename T>
inline void norm_rope_pair(
    float x1, float x2, float w1, float w2, float inv_rms, float angle,
    thread float& out1, thread float& out2) {
    const float c = round_to<T>(metal::precise::cos(angle));
    const float s = round_to<T>(metal::precise::sin(angle));
    const float y1 = round_to<T>(w1 * round_to<T>(x1 * inv_rms));
    const float y2 = round_to<T>(w2 * round_to<T>(x2 * inv_rms));
    out1 = round_to<T>(y1 * c) - round_to<T>(y2 * s);
    out2 = round_to<T>(y2 * c) + round_to<T>(y1 * s);
}
"""

# One thread per row (b, l, head) of x (B, L, heads, D), read through its strides (a slice of
# the fused qkv projection needs no copy); out is row-contiguous (B, heads, L, D).
KERNEL_SOURCE = """
    const uint row = thread_position_in_grid.x;
    const uint heads = x_shape[2], length = x_shape[1], dim = x_shape[3], half_dim = dim / 2;
    const uint h = row % heads, l = (row / heads) % length, b = row / (heads * length);
    const int64_t base = b * x_strides[0] + l * x_strides[1] + h * x_strides[2];
    const int64_t step = x_strides[3];
    float sum_sq = 0.0f;
    for (uint i = 0; i < dim; ++i) {
        const float v = static_cast<float>(x[base + i * step]);
        sum_sq += v * v;
    }
    const float inv_rms = metal::precise::rsqrt(sum_sq * (1.0f / static_cast<float>(dim)) + eps);
    const float position = static_cast<float>(l) + static_cast<float>(offset);
    const int64_t out_base = ((static_cast<int64_t>(b) * heads + h) * length + l) * dim;
    for (uint i = 0; i < half_dim; ++i) {
        const uint j = i + half_dim;
        const float angle = position * static_cast<float>(inv_freq[i * inv_freq_strides[0]]);
        float o1, o2;
        norm_rope_pair<T>(
            static_cast<float>(x[base + i * step]), static_cast<float>(x[base + j * step]),
            static_cast<float>(weight[i * weight_strides[0]]),
            static_cast<float>(weight[j * weight_strides[0]]), inv_rms, angle, o1, o2);
        out[out_base + i] = static_cast<T>(o1);
        out[out_base + j] = static_cast<T>(o2);
    }
"""

# Rows per threadgroup: each thread does 2 * head_dim loads, so small groups spread a prefill
# over more GPU cores; a decoding step (heads rows) is one group anyway.
THREADGROUP = 64
MAX_GRID = 2**31 - 1  # MLX takes the grid as 32-bit ints

# rtol per dtype for `agrees`, relative to the size of the rotated terms: float32 allows
# reduction order and cos/sin differences; half types a few roundings of the output type
# (one flipped rounding of the normalised value propagates through product and sum).
TOLERANCE = {mx.float32: 1e-5, mx.float16: 3 * 2.0**-10, mx.bfloat16: 3 * 2.0**-7}


def rope_tables(length: int, offset: int | mx.array, inv_freq: mx.array) -> tuple[mx.array, ...]:
    """cos and sin tables (L, 1, 2, head_dim/2) of positions offset..offset+L-1 for `norm_rope`.

    Angles in float32 as transformers computes them; sin carries rotate-half's sign: (-sin, sin).
    """
    positions = mx.arange(length, dtype=mx.float32) + offset
    angles = positions[:, None] * inv_freq[None, :]
    cos, sin = mx.cos(angles), mx.sin(angles)
    tables = mx.stack([cos, cos], axis=1), mx.stack([-sin, sin], axis=1)
    return tuple(t[:, None] for t in tables)


def norm_rope(x: mx.array, weight: mx.array, eps: float, cos: mx.array, sin: mx.array) -> mx.array:
    """RMSNorm each head of x (B, L, heads, D), then rotate with `rope_tables`; (B, heads, L, D).

    With x split into halves (x1, x2), the output halves are (x1*cos - x2*sin, x2*cos + x1*sin)
    = halves * cos + swapped halves * (-sin, sin), and swapping the halves is a strided view.
    The norm's scaling commutes with the swap (given the swapped weight), so `mx.compile` runs
    norm and rotation as one kernel after the sum of squares.
    """
    B, L, H, D = x.shape
    halves = x.astype(mx.float32).reshape(B, L, H, 2, D // 2)
    mean_sq = mx.mean(halves * halves, axis=(-2, -1), keepdims=True)
    inv_rms = mx.rsqrt(mean_sq + eps)
    weight = weight.reshape(2, D // 2)
    # As the reference: normalise in float32, cast back, scale, then rotate.
    y = weight * (halves * inv_rms).astype(x.dtype)
    y_swapped = weight[::-1] * (halves[..., ::-1, :] * inv_rms).astype(x.dtype)
    out = y * cos.astype(x.dtype) + y_swapped * sin.astype(x.dtype)
    return out.reshape(B, L, H, D).transpose(0, 2, 1, 3)


def qk_norm_rope_reference(
    x: mx.array, weight: mx.array, eps: float, positions_offset: int | mx.array, inv_freq: mx.array
) -> mx.array:
    """The plain path's arithmetic (what the kernel must reproduce); (B, heads, L, head_dim)."""
    return norm_rope(x, weight, eps, *rope_tables(x.shape[1], positions_offset, inv_freq))


def launch_geometry(shape: tuple[int, ...], dtype: mx.Dtype) -> dict[str, Any]:
    """Every launch argument that depends on x's shape (B, L, heads, D): one thread per row.

    MLX dispatches exact grids (the last threadgroup may be partial), so no tail check is needed.
    """
    if len(shape) != 4 or shape[3] % 2:
        raise ValueError(f"qk-norm+RoPE kernel needs (B, L, heads, even head_dim), got {shape}")
    B, L, H, D = shape
    rows = B * L * H
    if not 0 < rows <= MAX_GRID or D == 0:
        raise ValueError(f"qk-norm+RoPE kernel needs 1..{MAX_GRID} non-empty rows, got {shape}")
    return {
        "grid": (rows, 1, 1),
        "threadgroup": (min(THREADGROUP, rows), 1, 1),
        "output_shapes": [(B, H, L, D)],
        "output_dtypes": [dtype],
        "template": [("T", dtype)],
    }


@functools.lru_cache(maxsize=16)
def _eps_array(eps: float) -> mx.array:
    return mx.array(eps, dtype=mx.float32)


def eps_array(eps: float) -> mx.array:
    """eps as the 0-d float32 input a kernel reads (`const constant float&`), one per value."""
    return _eps_array(float(eps))


def offset_array(offset: int | mx.array) -> mx.array:
    """The offset as the 0-d int32 input the kernel reads (`const constant int&`)."""
    if not isinstance(offset, mx.array):
        return mx.array(offset, dtype=mx.int32)
    if offset.ndim == 0 and offset.dtype == mx.int32:
        return offset
    return offset.astype(mx.int32).reshape(())


def qk_norm_rope_metal(
    x: mx.array, weight: mx.array, eps: float, offset: int | mx.array, inv_freq: mx.array
) -> mx.array:
    """The kernel itself, unchecked: callers ask `qk_rope_kernel_usable` first."""
    return KERNEL([x, weight, inv_freq, eps_array(eps), offset_array(offset)])[0]


def probe() -> tuple[mx.array, mx.array, float, int, mx.array]:
    """Self-check input (x as a strided slice, weight, eps, offset, inv_freq), float32.

    Rows of zeros, tiny and large values next to normal ones; llama3-like frequencies from 1
    down to 1e-6 and positions around 70000, so large angles and the sign of sin show.
    """
    B, L, H, D = 2, 3, 5, 128
    rng = np.random.default_rng(0)
    qkv = rng.standard_normal((B, L, (H + 2) * D)).astype(np.float32)
    qkv[0, 0, D : 2 * D] = 0.0
    qkv[0, 1, 2 * D : 3 * D] *= 1e-4
    qkv[1, 2, 3 * D : 4 * D] *= 300.0
    x = mx.array(qkv)[..., D : (H + 1) * D].reshape(B, L, H, D)
    weight = mx.array(rng.uniform(0.05, 2.0, D).astype(np.float32))
    inv_freq = mx.array(np.geomspace(1.0, 1e-6, D // 2).astype(np.float32))
    return x, weight, 1e-6, 69999, inv_freq


def agrees(
    got: mx.array,
    want: mx.array,
    x: mx.array,
    weight: mx.array,
    eps: float,
    slack: mx.array | float = 0.0,
) -> mx.array:
    """Per element of (B, heads, L, D): does `got` match the reference output `want`?

    Each output is the sum of two rotated terms, so the bound scales with their size (the
    normalised, weighted x at both positions of the pair), not only with the result; nan must
    meet nan and infinities must match. `slack` widens the bound where x itself is only known
    within a tolerance (the fused projection's, in `qmv.py`).
    """
    xf = x.astype(mx.float32)
    y = mx.abs(weight.astype(mx.float32) * xf * mx.rsqrt(mx.mean(xf * xf, -1, True) + eps))
    terms = (y + mx.concatenate(mx.split(y, 2, axis=-1)[::-1], axis=-1)).transpose(0, 2, 1, 3)
    g, w = got.astype(mx.float32), want.astype(mx.float32)
    close = mx.abs(g - w) <= 1e-30 + TOLERANCE[x.dtype] * (mx.abs(w) + terms) + slack
    return mx.where(mx.isfinite(w), close, (g == w) | (mx.isnan(g) & mx.isnan(w)))


def _self_check(dtype: mx.Dtype) -> bool:
    """Does the kernel agree with the reference on the probe in `dtype`?"""
    x, weight, eps, offset, inv_freq = probe()
    x, weight = x.astype(dtype), weight.astype(dtype)
    got = qk_norm_rope_metal(x, weight, eps, mx.array(offset, dtype=mx.int32), inv_freq)
    want = qk_norm_rope_reference(x, weight, eps, offset, inv_freq)
    return mx.all(agrees(got, want, x, weight, eps)).item()


KERNEL = SelfCheckedKernel(
    label="qk-norm+RoPE",
    name="apertus_qk_norm_rope",
    # In the order of MLX's generated signature.
    input_names=("x", "weight", "inv_freq", "eps", "offset"),
    source=KERNEL_SOURCE,
    header=KERNEL_HEADER,
    geometry=launch_geometry,
    self_check=_self_check,
    fallback="mx.fast",
    fallback_note="mx.fast.rms_norm and rope",
    ensure_row_contiguous=False,  # x is read through its strides
)


def qk_rope_kernel_usable(x: mx.array, weight: mx.array, plan: Plan) -> bool:
    """Will the kernel run for these arrays? Asks the plan, then self-checks on first use.

    Needs a float type shared by x and weight (head_dim,), and a grid that fits.
    """
    shape_ok = x.ndim == 4 and x.shape[-1] % 2 == 0 and weight.shape == (x.shape[-1],)
    shape_ok = shape_ok and 0 < x.size <= MAX_GRID * x.shape[-1]
    return plan.metal_kernels and shape_ok and x.dtype == weight.dtype and KERNEL.usable(x.dtype)


def qk_rope_backend(plan: Plan) -> str:
    """Which path the model's q/k norm and rotation take under `plan`, for `--stats`.

    "metal" (this kernel), "mx.fast" (Metal without it) or "plain" (the CPU's fusable ops).
    Where the plan allows kernels this says "metal" until a self-check fails.
    """
    return KERNEL.status(plan) if plan.fast_ops else "plain"


def fast_norm_rope(
    x: mx.array,
    weight: mx.array,
    eps: float,
    offset: int | mx.array,
    inv_freq: mx.array,
    wavelengths: mx.array,
    plan: Plan,
) -> mx.array:
    """The Metal path of QK-norm + RoPE: this kernel where usable, else `mx.fast`'s two.

    x: (B, L, heads, head_dim), any strides; returns (B, heads, L, head_dim) in x's dtype.
    `wavelengths` = 1 / inv_freq, what mx.fast.rope calls `freqs`.
    """
    if qk_rope_kernel_usable(x, weight, plan):
        return qk_norm_rope_metal(x, weight, eps, offset, inv_freq)
    return mx.fast.rope(
        mx.fast.rms_norm(x, weight, eps).transpose(0, 2, 1, 3),
        x.shape[-1],
        traditional=False,
        base=None,
        scale=1.0,
        offset=offset,
        freqs=wavelengths,
    )


def qk_norm_rope(
    x: mx.array,
    weight: mx.array,
    eps: float,
    offset: int | mx.array,
    inv_freq: mx.array,
    plan: Plan,
) -> mx.array:
    """RMSNorm (weight, eps) and rotate (positions offset.., float32 inv_freq) each head of x.

    x: (B, L, heads, head_dim), any strides; returns (B, heads, L, head_dim) in x's dtype. The
    kernel where usable (see `qk_rope_kernel_usable`), else the reference arithmetic.
    """
    if qk_rope_kernel_usable(x, weight, plan):
        return qk_norm_rope_metal(x, weight, eps, offset, inv_freq)
    return qk_norm_rope_reference(x, weight, eps, offset, inv_freq)
