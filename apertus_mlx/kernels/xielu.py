"""xIELU with the checkpoint's learned scalars, as a Metal kernel or an mx.compile'd function.

y = a_p*x*x + beta*x for x > 0, else (expm1(min(x, eps)) - x)*a_n + beta*x, where
a_p = softplus(alpha_p) and a_n = beta + softplus(alpha_n) (computed by `model.XIELU` in the
graph, so an updated alpha is honoured like any other weight).

Two paths compute the same formula in float32:
- a Metal kernel (`mx.fast.metal_kernel`), where the plan allows our kernels. One thread per
  element; the constants are kernel inputs, so one compiled kernel serves every layer. It checks
  itself against `xielu_reference` on first use per dtype and, on any failure, logs one line
  and hands over to the compiled path for good.
- an `mx.compile`d reference, which MLX fuses into one element-wise kernel on any backend and
  which also works inside an outer `mx.compile`d function.

The formula's kernel text (`KERNEL_HEADER`'s `xielu_value`) also serves the quantized
up-projection's epilogue (`qmv.py`). It sticks to built-ins a C++ compiler accepts given a
small stand-in header, so tests on machines without Metal compile and run it with g++
(docs/metal-kernels.md).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import mlx.core as mx

from .metal import SelfCheckedKernel

if TYPE_CHECKING:
    from ..plan import Plan

# Metal's standard library has no expm1, so the kernel carries one. Only m <= eps < 0 reaches
# it: below -0.5, exp(m) - 1 loses at most a few ulp; above, a Taylor series avoids the
# cancellation of exp(m) - 1 near zero (truncation < 1.5e-8 relative at m = -0.5).
KERNEL_HEADER = """
inline float xielu_expm1_nonpositive(float m) {
    if (m < -0.5f) {
        return metal::precise::exp(m) - 1.0f;
    }
    float s = 1.0f;
    for (int k = 8; k >= 2; --k) {
        s = 1.0f + m * s / static_cast<float>(k);
    }
    return m * s;
}

// xIELU of v in float32, given the effective constants.
inline float xielu_value(float v, float a_p, float a_n, float beta, float eps) {
    if (v > 0.0f) {
        return a_p * v * v + beta * v;
    }
    float m = metal::min(v, eps);
    return (xielu_expm1_nonpositive(m) - v) * a_n + beta * v;
}
"""

KERNEL_SOURCE = """
    uint i = thread_position_in_grid.x;
    out[i] = static_cast<T>(xielu_value(static_cast<float>(x[i]), a_p, a_n, beta, eps));
"""

THREADGROUP = 256
MAX_GRID = 2**31 - 1  # MLX takes the grid as 32-bit ints

# (rtol, atol) per dtype for `agrees`: a few float32 ulps, plus one ulp of the output type.
TOLERANCE = {
    mx.float32: (1e-5, 1e-9),
    mx.float16: (2e-3, 1e-7),
    mx.bfloat16: (1e-2, 1e-9),
}


def xielu_reference(
    x: mx.array, a_p: mx.array, a_n: mx.array, beta: mx.array, eps: mx.array
) -> mx.array:
    """The formula as transformers writes it, computed in float32 and cast back."""
    xf = x.astype(mx.float32)
    positive = a_p * xf * xf + beta * xf
    negative = (mx.expm1(mx.minimum(xf, eps)) - xf) * a_n + beta * xf
    return mx.where(xf > 0, positive, negative).astype(x.dtype)


xielu_compiled = mx.compile(xielu_reference)


def launch_geometry(shape: tuple[int, ...], dtype: mx.Dtype) -> dict[str, Any]:
    """Every launch argument that depends on the input: one thread per element, grid = size.

    MLX dispatches exact grids (the last threadgroup may be partial), so no tail check is needed.
    """
    size = math.prod(shape)
    if not 0 < size <= MAX_GRID:
        raise ValueError(f"xIELU kernel needs 1..{MAX_GRID} elements, got {size}")
    return {
        "grid": (size, 1, 1),
        "threadgroup": (min(THREADGROUP, size), 1, 1),
        "output_shapes": [tuple(shape)],
        "output_dtypes": [dtype],
        "template": [("T", dtype)],
    }


def scalars(*values: mx.array) -> list[mx.array]:
    """0-d float32 arrays, which become `const constant float&` in a kernel's signature."""
    return [
        c if c.ndim == 0 and c.dtype == mx.float32 else c.astype(mx.float32).reshape(())
        for c in values
    ]


def xielu_metal(
    x: mx.array, a_p: mx.array, a_n: mx.array, beta: mx.array, eps: mx.array
) -> mx.array:
    """The kernel itself, unchecked: callers ask `xielu_kernel_usable` first."""
    return KERNEL([x, *scalars(a_p, a_n, beta, eps)])[0]


def probe_values() -> list[float]:
    """Inputs for the self-check: edges of both branches, eps's neighbourhood, specials."""
    edges = [0.0, -0.0, 1e-6, -1e-6, -1e-7, -2e-6, 1e-30, -1e-30, 1e-3, -1e-3, 0.5, -0.5]
    edges += [-0.49, -0.51, 1.0, -1.0, 3.0, -3.0, 100.0, -100.0, 6e4, -6e4, 1e20, -1e20]
    edges += [math.inf, -math.inf, math.nan]
    return edges + [i / 8 for i in range(-160, 161)]


def agrees(got: mx.array, want: mx.array, x: mx.array) -> mx.array:
    """Per element: does `got` match the reference output `want` for input x?

    The negative branch cancels near its root (x ~ -2.6), so the error bound scales with the
    size of the terms (~|x|), not only of the result. nan must meet nan, infinities must match.
    """
    g, w, xf = (a.astype(mx.float32) for a in (got, want, x))
    rtol, atol = TOLERANCE[x.dtype]
    close = mx.abs(g - w) <= atol + rtol * (mx.abs(w) + mx.abs(xf))
    return mx.where(mx.isfinite(w), close, (g == w) | (mx.isnan(g) & mx.isnan(w)))


def _self_check(dtype: mx.Dtype) -> bool:
    """Does the kernel agree with the reference on the probe in `dtype`?"""
    x = mx.array(probe_values(), dtype=mx.float32).astype(dtype)
    # Distinct a_p and a_n, so swapped constants show.
    consts = [mx.array(v, dtype=mx.float32) for v in (0.83, 0.77, 0.5, -1e-6)]
    return mx.all(agrees(xielu_metal(x, *consts), xielu_reference(x, *consts), x)).item()


KERNEL = SelfCheckedKernel(
    label="xIELU",
    name="apertus_xielu",
    # In the order of MLX's generated signature.
    input_names=("x", "a_p", "a_n", "beta", "eps"),
    source=KERNEL_SOURCE,
    header=KERNEL_HEADER,
    geometry=launch_geometry,
    self_check=_self_check,
    fallback="compiled",
    fallback_note="the mx.compile path",
)


def xielu_backend(plan: Plan) -> str:
    """Which path `xielu` takes under `plan`, for `--stats`: "metal" or "compiled".

    Where the plan allows kernels this says "metal" until a self-check fails.
    """
    return KERNEL.status(plan)


def xielu_kernel_usable(x: mx.array, plan: Plan) -> bool:
    """Will `xielu` run the kernel on x? Asks the plan, then self-checks on first use."""
    return plan.metal_kernels and 0 < x.size <= MAX_GRID and KERNEL.usable(x.dtype)


def xielu(
    x: mx.array, a_p: mx.array, a_n: mx.array, beta: mx.array, eps: mx.array, plan: Plan
) -> mx.array:
    """xIELU of x (float32/float16/bfloat16) with 0-d float32 constants; same dtype out."""
    if xielu_kernel_usable(x, plan):
        return xielu_metal(x, a_p, a_n, beta, eps)
    return xielu_compiled(x, a_p, a_n, beta, eps)
