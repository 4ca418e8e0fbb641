"""Quantized matrix-vector products for decoding (1..8 rows), as Metal kernels, three ways.

A decoding step multiplies one token's activations (a few, when verifying drafted tokens) with
every weight matrix once: the work is reading the packed weights, and on small models the
launches. MLX's `quantized_matmul` is one launch per projection; these kernels also fold in the
work that follows it, saving a launch and a round trip of the intermediate through memory:

- `QMV`: y = x W^T for MLX's affine packing (2, 3, 4, 5, 6, 8 bits; groups of 32, 64, 128).
- `QMV_XIELU`: the MLP's up-projection with xIELU as its epilogue (Apertus's MLP has no gate,
  so the activated vector is written directly).
- `QKV_ROPE`: the fused q/k/v projection ending in QK-norm + RoPE, written in the
  (batch, heads, length, head_dim) layout attention and the KV cache take.

How they work (after MLX's `quantized.h` qmv kernels and llama.cpp's Metal mat-vec kernels):
the packed row is one little-endian bit stream (value k at bit k*bits), read in chunks of 8
values that lie in one group and in a 64-bit window of two words, so a 3- or 6-bit value that
straddles a word boundary is read whole. Each lane of a simdgroup takes chunks of the input
dimension, caches the chunk of x for every row of x, and accumulates in float32
`scale * sum(x*q) + bias * sum(x)` per group for several output rows at once; `simd_sum` adds
the lanes' parts. `QMV` splits the input dimension between two simdgroups too and adds their
parts through threadgroup memory; `QKV_ROPE` gives one threadgroup a whole head, so the norm
over head_dim can read it from threadgroup memory after a barrier.

The result equals `quantized_reference` (mx.quantized_matmul accumulating in float32, as MLX's
Metal kernels do, rounded once to x's dtype) within the tolerance of the accumulation order
(`agrees`); the epilogues then follow `xielu.py` and `qk_rope.py` operation for operation.
Where they run is `linear.py`'s decision: the plan allows kernels, the self-check passed, and
the kernel measured faster than MLX's path on the layer's shape.
"""

from __future__ import annotations

import math
from typing import Any

import mlx.core as mx
import numpy as np

from . import qk_rope
from .metal import SelfCheckedKernel
from .xielu import KERNEL_HEADER as XIELU_HEADER
from .xielu import TOLERANCE as XIELU_TOLERANCE
from .xielu import scalars, xielu_reference

BITS = (2, 3, 4, 5, 6, 8)  # every affine width whose chunk of 8 values fits two words
GROUPS = (32, 64, 128)
MAX_ROWS = 8  # rows of x: a decoded token, or a drafted block being verified
MAX_HEAD_DIM = 256  # threadgroup memory holds MAX_ROWS heads in float32

RPS = 4  # output rows a simdgroup accumulates at once (x's chunk is reused across them)
SIMDGROUPS = 2  # QMV: simdgroups sharing the input dimension of one threadgroup's rows
HEAD_SIMDGROUPS = 8  # QKV_ROPE: simdgroups computing one head's rows
SIMD = 32
MAX_GRID = 2**31 - 1

# Per dtype: one rounding of the output type (relative), its smallest subnormal (absolute).
ROUNDING = {mx.float32: 2.0**-23, mx.float16: 2.0**-10, mx.bfloat16: 2.0**-7}
SMALLEST = {mx.float32: 1.5e-45, mx.float16: 6e-8, mx.bfloat16: 1e-40}
# float32 sums of up to ~30000 terms in another order, relative to the sum of their sizes.
ACCUMULATION = 1e-5

HEADER = (
    qk_rope.KERNEL_HEADER
    + XIELU_HEADER
    + """
// Sizes every quantized kernel here shares: chunks of VPT values, each in one group (GROUP is
// a multiple of 8) and in a window of two words (VPT * BITS <= 64, starting at a multiple of
// 8 bits), so one 64-bit window holds a whole chunk, straddling 3- and 6-bit values too.
static constant constexpr const int VPT = 8;
"""
)

# acc[m][r] += row m of x times output row `n` (an expression of r), over chunk c of the input.
_CHUNK = """
        float xv[ROWS][VPT];
        float xsum[ROWS];
        for (int m = 0; m < ROWS; ++m) {{
            xsum[m] = 0.0f;
            for (int i = 0; i < VPT; ++i) {{
                xv[m][i] = static_cast<float>(x[m * K + c * VPT + i]);
                xsum[m] += xv[m][i];
            }}
        }}
        const uint bit = c * VPT * BITS;  // where the chunk starts in its row's bit stream
        const uint shift = bit % 32;
        const uint g = c * VPT / GROUP;
        for (int r = 0; r < RPS; ++r) {{
            const uint n = {row};
            const uint word = n * (K * BITS / 32) + bit / 32;
            ulong window = w[word];
            if (shift + VPT * BITS > 32) {{  // the chunk runs on into the next word
                window |= static_cast<ulong>(w[word + 1]) << 32;
            }}
            float values[VPT];
            for (int i = 0; i < VPT; ++i) {{
                const uint value = static_cast<uint>(window >> (shift + i * BITS)) & MASK;
                values[i] = static_cast<float>(value);
            }}
            const float scale = static_cast<float>(scales[n * (K / GROUP) + g]);
            const float bias = static_cast<float>(biases[n * (K / GROUP) + g]);
            for (int m = 0; m < ROWS; ++m) {{
                float dot = 0.0f;
                for (int i = 0; i < VPT; ++i) {{
                    dot += xv[m][i] * values[i];
                }}
                acc[m][r] += scale * dot + bias * xsum[m];
            }}
        }}
"""

# Threadgroup t computes output rows [t*RPS, t*RPS + RPS) for every row of x (ROWS, K). Lane l
# of simdgroup s takes chunks s*32 + l, then every SG*32-th; the simdgroups' parts meet in
# threadgroup memory. Rows past N repeat the last row (so every read is in bounds), unwritten.
_QMV_SOURCE = (
    """
    threadgroup float parts[SG][ROWS][RPS];
    constexpr uint MASK = (1u << BITS) - 1u;
    const uint K = x_shape[1];
    const uint N = w_shape[0];
    const uint first = threadgroup_position_in_grid.x * RPS;
    const uint sg = simdgroup_index_in_threadgroup;
    const uint lane = thread_index_in_simdgroup;
    float acc[ROWS][RPS];
    for (int m = 0; m < ROWS; ++m) {
        for (int r = 0; r < RPS; ++r) {
            acc[m][r] = 0.0f;
        }
    }
    for (uint c = sg * 32 + lane; c < K / VPT; c += SG * 32) {
"""
    + _CHUNK.format(row="metal::min(first + r, N - 1)")
    + """
    }
    for (int m = 0; m < ROWS; ++m) {
        for (int r = 0; r < RPS; ++r) {
            const float total = simd_sum(acc[m][r]);
            if (lane == 0) {
                parts[sg][m][r] = total;
            }
        }
    }
    threadgroup_barrier(mem_flags::mem_threadgroup);
    const uint t = sg * 32 + lane;  // thread t < ROWS * RPS adds up and writes one output
    if (t < ROWS * RPS && first + t % RPS < N) {
        const uint m = t / RPS, r = t % RPS;
        float y = 0.0f;
        for (int s = 0; s < SG; ++s) {
            y += parts[s][m][r];
        }
        out[m * N + first + r] = {epilogue};
    }
"""
)

QMV_SOURCE = _QMV_SOURCE.replace("{epilogue}", "static_cast<T>(y)")
# As the unfused path: the projection rounded to T, then xIELU of that in float32.
QMV_XIELU_SOURCE = _QMV_SOURCE.replace(
    "{epilogue}", "static_cast<T>(xielu_value(round_to<T>(y), a_p, a_n, beta, eps))"
)

# Threadgroup h computes head h of the fused projection (QH q heads, KVH k heads, KVH v heads:
# rows h*D .. h*D + D-1) for every row of x (B, L, K), each simdgroup RPS of its rows at a time
# over the whole input, into threadgroup memory, rounded to T as the unfused projection is.
# After a barrier, simdgroup s takes rows m = s, s+SG, ... of x: q and k heads are normalised
# (sum of squares by simd_sum) and rotated as `qk_rope.py` does; v heads are copied out.
QKV_SOURCE = (
    """
    threadgroup float head[ROWS][D];
    constexpr uint MASK = (1u << BITS) - 1u;
    const uint L = x_shape[1];
    const uint K = x_shape[2];
    const uint h = threadgroup_position_in_grid.x;
    const uint sg = simdgroup_index_in_threadgroup;
    const uint lane = thread_index_in_simdgroup;
    for (uint r0 = sg * RPS; r0 < D; r0 += SG * RPS) {
        float acc[ROWS][RPS];
        for (int m = 0; m < ROWS; ++m) {
            for (int r = 0; r < RPS; ++r) {
                acc[m][r] = 0.0f;
            }
        }
        for (uint c = lane; c < K / VPT; c += 32) {
"""
    + _CHUNK.format(row="h * D + metal::min(r0 + r, D - 1)")
    + """
        }
        for (int m = 0; m < ROWS; ++m) {
            for (int r = 0; r < RPS; ++r) {
                const float total = simd_sum(acc[m][r]);
                if (lane == 0 && r0 + r < D) {
                    head[m][r0 + r] = round_to<T>(total);
                }
            }
        }
    }
    threadgroup_barrier(mem_flags::mem_threadgroup);
    for (uint m = sg; m < ROWS; m += SG) {
        const uint b = m / L, l = m % L;
        if (h >= QH + KVH) {
            const uint base = ((b * KVH + (h - QH - KVH)) * L + l) * D;
            for (uint i = lane; i < D; i += 32) {
                v[base + i] = static_cast<T>(head[m][i]);
            }
            continue;
        }
        float sum_sq = 0.0f;
        for (uint i = lane; i < D; i += 32) {
            sum_sq += head[m][i] * head[m][i];
        }
        sum_sq = simd_sum(sum_sq);
        const float inv_rms = metal::precise::rsqrt(sum_sq * (1.0f / static_cast<float>(D)) + eps);
        const float position = static_cast<float>(l) + static_cast<float>(offset);
        const bool is_q = h < QH;
        const uint base = ((b * (is_q ? QH : KVH) + (is_q ? h : h - QH)) * L + l) * D;
        for (uint i = lane; i < D / 2; i += 32) {
            const uint j = i + D / 2;
            const float w1 = static_cast<float>(is_q ? q_norm[i] : k_norm[i]);
            const float w2 = static_cast<float>(is_q ? q_norm[j] : k_norm[j]);
            const float angle = position * inv_freq[i];
            float o1, o2;
            norm_rope_pair<T>(head[m][i], head[m][j], w1, w2, inv_rms, angle, o1, o2);
            if (is_q) {
                q[base + i] = static_cast<T>(o1);
                q[base + j] = static_cast<T>(o2);
            } else {
                k[base + i] = static_cast<T>(o1);
                k[base + j] = static_cast<T>(o2);
            }
        }
    }
"""
)


# --- references and the agreement rule --------------------------------------------------------


def quantized_reference(
    x: mx.array, w: mx.array, scales: mx.array, biases: mx.array, bits: int, group: int
) -> mx.array:
    """mx.quantized_matmul(x, w^T) accumulated in float32, rounded once to x's dtype.

    That is what MLX's Metal kernels compute; its CPU kernel accumulates in x's dtype, which for
    half types is a looser answer than the one asked of our kernels. Widening is exact.
    """
    f32 = mx.float32
    y = mx.quantized_matmul(
        x.astype(f32), w, scales.astype(f32), biases.astype(f32), True, group, bits
    )
    return y.astype(x.dtype)


def magnitude(
    x: mx.array, w: mx.array, scales: mx.array, biases: mx.array, bits: int, group: int
) -> mx.array:
    """Per output, sum_k |x_k| (|scale| q_k + |bias|): the size of the terms a kernel adds up,
    including the per-group `scale * sum(x*q)` and `bias * sum(x)` that may cancel."""
    f32 = mx.float32
    return mx.quantized_matmul(
        mx.abs(x.astype(f32)),
        w,
        mx.abs(scales.astype(f32)),
        mx.abs(biases.astype(f32)),
        True,
        group,
        bits,
    )


def tolerance(want: mx.array, size: mx.array, dtype: mx.Dtype) -> mx.array:
    """How far a kernel's output may be from `quantized_reference`: float32 sums in another
    order (relative to `size`, the `magnitude`) plus one rounding of the output type."""
    wf = mx.abs(want.astype(mx.float32))
    return SMALLEST[dtype] + ROUNDING[dtype] * wf + ACCUMULATION * size


def agrees(got: mx.array, want: mx.array, size: mx.array) -> mx.array:
    """Per element: does `got` match the reference `want`, given the terms' size `size`?
    nan must meet nan and infinities must match."""
    g, w = got.astype(mx.float32), want.astype(mx.float32)
    close = mx.abs(g - w) <= tolerance(want, size, want.dtype)
    return mx.where(mx.isfinite(w), close, (g == w) | (mx.isnan(g) & mx.isnan(w)))


XIELU_CONSTANTS = (0.83, 0.77, 0.5, -1e-6)  # a_p, a_n, beta, eps: distinct, so a swap shows


def agrees_xielu(
    got: mx.array, want_pre: mx.array, size: mx.array, consts: tuple[mx.array, ...]
) -> mx.array:
    """Per element: does `got` match xIELU of the reference projection `want_pre`?

    xIELU's own tolerance (`xielu.TOLERANCE`, relative to the result and its input), plus the
    projection's `tolerance` carried over by xIELU's slope (at most 2 a_p |y| + beta + a_n).
    """
    a_p, a_n, beta, _ = (float(c.item()) for c in consts)
    want = xielu_reference(want_pre, *consts)
    g, w, y = (a.astype(mx.float32) for a in (got, want, want_pre))
    rtol, atol = XIELU_TOLERANCE[got.dtype]
    slope = 2 * a_p * mx.abs(y) + beta + a_n
    carried = slope * tolerance(want_pre, size, want_pre.dtype)
    close = mx.abs(g - w) <= atol + rtol * (mx.abs(w) + mx.abs(y)) + carried
    return mx.where(mx.isfinite(w), close, (g == w) | (mx.isnan(g) & mx.isnan(w)))


# --- launch geometry ----------------------------------------------------------------------------


def _check(rows: int, in_dims: int, bits: int, group: int) -> None:
    if bits not in BITS or group not in GROUPS:
        raise ValueError(f"quantized kernels serve {BITS} bits in groups of {GROUPS}")
    if not 1 <= rows <= MAX_ROWS or in_dims <= 0 or in_dims % group:
        raise ValueError(f"quantized kernels need 1..{MAX_ROWS} rows of whole groups")


def qmv_geometry(
    shape: tuple[int, ...],
    dtype: mx.Dtype,
    *,
    out_dims: int,
    bits: int,
    group: int,
    scales_dtype: mx.Dtype,
) -> dict[str, Any]:
    """Launch of `QMV` / `QMV_XIELU` on x (rows, K): a threadgroup of SIMDGROUPS simdgroups per
    RPS output rows (the last group partial when RPS does not divide `out_dims`)."""
    rows, in_dims = shape
    _check(rows, in_dims, bits, group)
    groups = -(-out_dims // RPS)
    threads = SIMDGROUPS * SIMD
    if out_dims <= 0 or groups * threads > MAX_GRID:
        raise ValueError(f"quantized kernel cannot launch {out_dims} output rows")
    return {
        "grid": (groups * threads, 1, 1),
        "threadgroup": (threads, 1, 1),
        "output_shapes": [(rows, out_dims)],
        "output_dtypes": [dtype],
        "template": [
            ("T", dtype),
            ("S", scales_dtype),
            ("BITS", bits),
            ("GROUP", group),
            ("ROWS", rows),
            ("RPS", RPS),
            ("SG", SIMDGROUPS),
        ],
    }


def qkv_geometry(
    shape: tuple[int, ...],
    dtype: mx.Dtype,
    *,
    heads: int,
    kv_heads: int,
    head_dim: int,
    bits: int,
    group: int,
    scales_dtype: mx.Dtype,
) -> dict[str, Any]:
    """Launch of `QKV_ROPE` on x (B, L, K): one threadgroup of HEAD_SIMDGROUPS simdgroups per
    head of q, k and v; outputs q (B, heads, L, D), k and v (B, kv_heads, L, D)."""
    B, L, in_dims = shape
    _check(B * L, in_dims, bits, group)
    if head_dim % 2 or not 0 < head_dim <= MAX_HEAD_DIM or heads <= 0 or kv_heads <= 0:
        raise ValueError(f"fused q/k/v kernel needs an even head_dim up to {MAX_HEAD_DIM}")
    threads = HEAD_SIMDGROUPS * SIMD
    return {
        "grid": ((heads + 2 * kv_heads) * threads, 1, 1),
        "threadgroup": (threads, 1, 1),
        "output_shapes": [(B, heads, L, head_dim), *[(B, kv_heads, L, head_dim)] * 2],
        "output_dtypes": [dtype] * 3,
        "template": [
            ("T", dtype),
            ("S", scales_dtype),
            ("BITS", bits),
            ("GROUP", group),
            ("ROWS", B * L),
            ("D", head_dim),
            ("QH", heads),
            ("KVH", kv_heads),
            ("RPS", RPS),
            ("SG", HEAD_SIMDGROUPS),
        ],
    }


# --- launches (unchecked: `linear.py` decides where they run) -----------------------------------


def qmv_metal(
    x: mx.array, w: mx.array, scales: mx.array, biases: mx.array, bits: int, group: int
) -> mx.array:
    """x (..., K) times the quantized w (N, K)^T: (..., N) in x's dtype."""
    rows = math.prod(x.shape[:-1])
    [y] = QMV(
        [x.reshape(rows, x.shape[-1]), w, scales, biases],
        out_dims=w.shape[0],
        bits=bits,
        group=group,
        scales_dtype=scales.dtype,
    )
    return y.reshape(*x.shape[:-1], w.shape[0])


def qmv_xielu_metal(
    x: mx.array,
    w: mx.array,
    scales: mx.array,
    biases: mx.array,
    bits: int,
    group: int,
    consts: tuple[mx.array, ...],
) -> mx.array:
    """xIELU(x W^T) with the constants (a_p, a_n, beta, eps): (..., N) in x's dtype."""
    rows = math.prod(x.shape[:-1])
    [y] = QMV_XIELU(
        [x.reshape(rows, x.shape[-1]), w, scales, biases, *scalars(*consts)],
        out_dims=w.shape[0],
        bits=bits,
        group=group,
        scales_dtype=scales.dtype,
    )
    return y.reshape(*x.shape[:-1], w.shape[0])


def qkv_norm_rope_metal(
    x: mx.array,
    w: mx.array,
    scales: mx.array,
    biases: mx.array,
    bits: int,
    group: int,
    q_norm: mx.array,
    k_norm: mx.array,
    eps: float,
    offset: int | mx.array,
    inv_freq: mx.array,
    heads: int,
    kv_heads: int,
) -> tuple[mx.array, mx.array, mx.array]:
    """q, k (normed, rotated from position `offset`) and v of x (B, L, K), each (B, h, L, D)."""
    head_dim = w.shape[0] // (heads + 2 * kv_heads)
    eps_in, offset_in = qk_rope.eps_array(eps), qk_rope.offset_array(offset)
    q, k, v = QKV_ROPE(
        [x, w, scales, biases, q_norm, k_norm, inv_freq, eps_in, offset_in],
        heads=heads,
        kv_heads=kv_heads,
        head_dim=head_dim,
        bits=bits,
        group=group,
        scales_dtype=scales.dtype,
    )
    return q, k, v


def qkv_reference(
    x: mx.array,
    w: mx.array,
    scales: mx.array,
    biases: mx.array,
    bits: int,
    group: int,
    q_norm: mx.array,
    k_norm: mx.array,
    eps: float,
    offset: int | mx.array,
    inv_freq: mx.array,
    heads: int,
    kv_heads: int,
) -> tuple[mx.array, mx.array, mx.array]:
    """The unfused arithmetic `qkv_norm_rope_metal` must reproduce: projection, split, then
    `qk_rope`'s reference on q and k; v transposed."""
    B, L, _ = x.shape
    head_dim = w.shape[0] // (heads + 2 * kv_heads)
    y = quantized_reference(x, w, scales, biases, bits, group).reshape(B, L, -1, head_dim)
    q, k, v = y[:, :, :heads], y[:, :, heads : heads + kv_heads], y[:, :, heads + kv_heads :]
    q = qk_rope.qk_norm_rope_reference(q, q_norm, eps, offset, inv_freq)
    k = qk_rope.qk_norm_rope_reference(k, k_norm, eps, offset, inv_freq)
    return q, k, v.transpose(0, 2, 1, 3)


def agrees_qkv(
    got: tuple[mx.array, ...],
    want: tuple[mx.array, ...],
    pre: mx.array,
    size: mx.array,
    norms: tuple[mx.array, mx.array],
    eps: float,
    heads: int,
) -> list[mx.array]:
    """Per element of q, k and v: do they match the reference?

    `pre` (B, L, heads+2kv, D) is the reference projection and `size` its `magnitude`. v is the
    projection itself. q and k follow `qk_rope.agrees`, widened by what our projection's own
    tolerance becomes after the norm: up to 4 max|weight| * max tolerance / rms of the head.
    """
    B, L, total, D = pre.shape
    kv = (total - heads) // 2
    tol = tolerance(pre, size.reshape(pre.shape), pre.dtype)
    pf = pre.astype(mx.float32)
    rms = mx.sqrt(mx.mean(pf * pf, axis=-1, keepdims=True) + eps)
    out = []
    for i, (first, count) in enumerate(((0, heads), (heads, kv), (heads + kv, kv))):
        part = slice(first, first + count)
        if i == 2:
            ok = agrees(got[2], want[2], size.reshape(pre.shape)[:, :, part].transpose(0, 2, 1, 3))
            out.append(ok)
            continue
        weight = norms[i]
        wmax = mx.max(mx.abs(weight.astype(mx.float32)))
        carried = 4 * wmax * mx.max(tol[:, :, part], axis=-1, keepdims=True) / rms[:, :, part]
        slack = carried.transpose(0, 2, 1, 3)
        out.append(qk_rope.agrees(got[i], want[i], pre[:, :, part], weight, eps, slack=slack))
    return out


# --- self-checks --------------------------------------------------------------------------------


def probe_layer(
    out_dims: int,
    in_dims: int,
    bits: int,
    group: int,
    dtype: mx.Dtype,
    scales_dtype: mx.Dtype,
    shape: tuple[int, ...],
    seed: int = 0,
) -> tuple[mx.array, mx.array, mx.array, mx.array]:
    """x of `shape` (last dimension `in_dims`), and a random packed layer (w, scales, biases).

    Every bit pattern occurs; some scales and biases are zero or negative; one row of x is
    large; sizes keep every result inside float16's range.
    """
    rng = np.random.default_rng(seed)
    words = rng.integers(0, 2**32, (out_dims, in_dims * bits // 32), dtype=np.uint64)
    scale = 2.0 / 2**bits
    scales = rng.uniform(-scale, scale, (out_dims, in_dims // group))
    biases = rng.uniform(-1.0, 1.0, (out_dims, in_dims // group))
    scales[::5, 0] = 0.0
    biases[::7, -1] = 0.0
    x = rng.standard_normal(shape)
    x.reshape(-1, in_dims)[-1] *= 8.0
    return (
        mx.array(x.astype(np.float32)).astype(dtype),
        mx.array(words.astype(np.uint32)),
        mx.array(scales.astype(np.float32)).astype(scales_dtype),
        mx.array(biases.astype(np.float32)).astype(scales_dtype),
    )


# 3 groups of 128 = 48 chunks: both simdgroups of `QMV` work, the second on a partial round;
# 13 output rows leave the last threadgroup partial.
PROBE_IN, PROBE_OUT = 384, 13


def _check_qmv(dtype: mx.Dtype, scales_dtype: mx.Dtype, bits: int, group: int, rows: int) -> bool:
    x, w, s, b = probe_layer(
        PROBE_OUT, PROBE_IN, bits, group, dtype, scales_dtype, (rows, PROBE_IN)
    )
    got = qmv_metal(x, w, s, b, bits, group)
    want = quantized_reference(x, w, s, b, bits, group)
    return mx.all(agrees(got, want, magnitude(x, w, s, b, bits, group))).item()


def _check_qmv_xielu(
    dtype: mx.Dtype, scales_dtype: mx.Dtype, bits: int, group: int, rows: int
) -> bool:
    x, w, s, b = probe_layer(
        PROBE_OUT, PROBE_IN, bits, group, dtype, scales_dtype, (rows, PROBE_IN)
    )
    consts = tuple(mx.array(c, dtype=mx.float32) for c in XIELU_CONSTANTS)
    got = qmv_xielu_metal(x, w, s, b, bits, group, consts)
    pre = quantized_reference(x, w, s, b, bits, group)
    return mx.all(agrees_xielu(got, pre, magnitude(x, w, s, b, bits, group), consts)).item()


def probe_norms(head_dim: int, dtype: mx.Dtype) -> tuple[mx.array, mx.array, mx.array]:
    """q_norm and k_norm weights (distinct, so a swap shows) and llama3-like frequencies."""
    rng = np.random.default_rng(1)
    q_norm = mx.array(rng.uniform(0.05, 2.0, head_dim).astype(np.float32)).astype(dtype)
    k_norm = mx.array(rng.uniform(0.05, 2.0, head_dim).astype(np.float32)).astype(dtype)
    inv_freq = mx.array(np.geomspace(1.0, 1e-6, head_dim // 2).astype(np.float32))
    return q_norm, k_norm, inv_freq


def _check_qkv(
    dtype: mx.Dtype,
    scales_dtype: mx.Dtype,
    bits: int,
    group: int,
    rows: int,
    head_dim: int,
    heads: int,
    kv_heads: int,
) -> bool:
    """The instance for `rows` rows of x, on x (1, rows, K): batch and length are run-time
    values of one instance, which the g++ tests vary."""
    out_dims = (heads + 2 * kv_heads) * head_dim
    x, w, s, b = probe_layer(
        out_dims, PROBE_IN, bits, group, dtype, scales_dtype, (1, rows, PROBE_IN)
    )
    q_norm, k_norm, inv_freq = probe_norms(head_dim, dtype)
    args = (x, w, s, b, bits, group, q_norm, k_norm, 1e-5, 69999, inv_freq, heads, kv_heads)
    got, want = qkv_norm_rope_metal(*args), qkv_reference(*args)
    pre = quantized_reference(x, w, s, b, bits, group).reshape(1, rows, -1, head_dim)
    size = magnitude(x, w, s, b, bits, group)
    oks = agrees_qkv(got, want, pre, size, (q_norm, k_norm), 1e-5, heads)
    return all(mx.all(ok).item() for ok in oks)


QMV = SelfCheckedKernel(
    label="qmv",
    name="apertus_qmv",
    input_names=("x", "w", "scales", "biases"),
    source=QMV_SOURCE,
    header=HEADER,
    geometry=qmv_geometry,
    self_check=_check_qmv,
    fallback="mlx",
    fallback_note="mx.quantized_matmul",
)

QMV_XIELU = SelfCheckedKernel(
    label="qmv+xielu",
    name="apertus_qmv_xielu",
    input_names=("x", "w", "scales", "biases", "a_p", "a_n", "beta", "eps"),
    source=QMV_XIELU_SOURCE,
    header=HEADER,
    geometry=qmv_geometry,
    self_check=_check_qmv_xielu,
    fallback="mlx",
    fallback_note="mx.quantized_matmul and xIELU",
)

QKV_ROPE = SelfCheckedKernel(
    label="qkv+norm+rope",
    name="apertus_qkv_norm_rope",
    input_names=(
        "x",
        "w",
        "scales",
        "biases",
        "q_norm",
        "k_norm",
        "inv_freq",
        "eps",
        "offset",
    ),  # fmt: skip
    output_names=("q", "k", "v"),
    source=QKV_SOURCE,
    header=HEADER,
    geometry=qkv_geometry,
    self_check=_check_qkv,
    fallback="mlx",
    fallback_note="mx.quantized_matmul and QK-norm + RoPE",
)

KERNELS = (QMV, QMV_XIELU, QKV_ROPE)
