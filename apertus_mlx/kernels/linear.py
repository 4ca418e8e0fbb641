"""Projections whose decoding steps may run our quantized Metal kernels (`qmv.py`).

The model builds its projections with `projection`: where the plan allows our kernels, as
`Linear`, an `nn.Linear` that knows the plan (elsewhere MLX's own layers). Loading quantizes
them (`nn.quantize` calls `to_quantized`) into `QuantizedLinear`, MLX's own layer
and weights, whose call on 1..8 rows runs `qmv.QMV` instead of `mx.quantized_matmul` where
- the plan allows our Metal kernels (decided once, at load),
- the layer is affine with bits and group size the kernel serves, and the dtypes fit,
- the kernel's self-check for this instance passed (once per process), and
- the kernel measured at least `metal.MIN_SPEEDUP` times as fast as MLX's path on a probe of
  this layer's shape (once per shape; the outcome is noted in the plan's `KernelRecord`).
`up_xielu` and `qkv_norm_rope` do the same for the fused variants. Everywhere else, and on
every prompt chunk longer than 8 tokens, MLX's path runs.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Hashable
from typing import Any

import mlx.core as mx
import mlx.nn as nn

from ..plan import Plan
from . import qk_rope, qmv
from .metal import SelfCheckedKernel
from .xielu import xielu

FLOATS = (mx.float32, mx.float16, mx.bfloat16)
PROBE_BYTES = 64 << 20  # largest packed weight a timing probe allocates (fewer inputs if need be)


def projection(input_dims: int, output_dims: int, bias: bool, plan: Plan) -> nn.Linear:
    """The model's linear layer: ours where the plan allows kernels, else MLX's own."""
    if plan.metal_kernels:
        return Linear(input_dims, output_dims, bias, plan)
    return nn.Linear(input_dims, output_dims, bias=bias)


class Linear(nn.Linear):
    """`nn.Linear` that quantizes into our `QuantizedLinear` where the plan allows kernels."""

    def __init__(self, input_dims: int, output_dims: int, bias: bool, plan: Plan) -> None:
        super().__init__(input_dims, output_dims, bias=bias)
        self.plan = plan

    def to_quantized(
        self,
        group_size: int | None = None,
        bits: int | None = None,
        mode: str = "affine",
        quantize_input: bool = False,
    ) -> nn.Module:
        if quantize_input or not self.plan.metal_kernels:
            return super().to_quantized(group_size, bits, mode, quantize_input)
        layer = QuantizedLinear.from_linear(self, group_size, bits, mode)
        layer.plan = self.plan
        return layer


class QuantizedLinear(nn.QuantizedLinear):
    """MLX's quantized linear; a decoding step's call may run `qmv.QMV` (see the module)."""

    plan: Plan

    def __call__(self, x: mx.array) -> mx.array:
        if self.serves(qmv.QMV, x, _qmv_probe):
            y = qmv.qmv_metal(x, *self.packed(), self.bits, self.group_size)
            return y + self["bias"] if "bias" in self else y
        return super().__call__(x)

    def packed(self) -> tuple[mx.array, mx.array, mx.array]:
        return self["weight"], self["scales"], self["biases"]

    def fits(self, x: mx.array) -> bool:
        """Could our kernels compute this call at all (before any self-check or timing)?"""
        rows = math.prod(x.shape[:-1])
        scales = self["scales"].dtype
        return (
            self.plan.metal_kernels
            and self.mode == "affine"
            and self.bits in qmv.BITS
            and self.group_size in qmv.GROUPS
            and 1 <= rows <= qmv.MAX_ROWS
            and x.shape[-1] * self.bits == self["weight"].shape[-1] * 32
            and x.dtype in FLOATS
            and (scales == x.dtype or x.dtype == mx.float32)  # else MLX's result is wider
        )

    def serves(
        self,
        kernel: SelfCheckedKernel,
        x: mx.array,
        probe: Callable[..., tuple[Callable[[], Any], Callable[[], Any]]],
        *variant: Hashable,
    ) -> bool:
        """Does `kernel` compute this call: it fits, checks out and is faster on this shape?

        `probe(layer, x, *variant)` returns (ours, theirs), thunks that run the kernel and
        MLX's path on fresh arrays of this call's shapes (the weights may be tracers of an
        `mx.compile`d forward, which cannot be evaluated while tracing); it is called only the
        first time this shape is timed.
        """
        if not self.fits(x):
            return False
        rows = math.prod(x.shape[:-1])
        instance = (self["scales"].dtype, self.bits, self.group_size, rows, *variant)
        if not kernel.usable(x.dtype, *instance):
            return False
        key = (x.dtype, *instance, self["weight"].shape[0], x.shape[-1])
        return kernel.faster(key, lambda: probe(self, x, *variant), self.plan.kernels)


def _probe_arrays(
    layer: QuantizedLinear, x: mx.array
) -> Callable[[], tuple[mx.array, mx.array, mx.array, mx.array]]:
    """A thunk making, once, x and weights of this call's shapes (fewer inputs if the weight
    would pass `PROBE_BYTES`: both paths' time is linear in them)."""
    out_dims, bits, group = layer["weight"].shape[0], layer.bits, layer.group_size
    in_dims = x.shape[-1]
    if out_dims * in_dims * bits // 8 > PROBE_BYTES:
        in_dims = max(group, PROBE_BYTES * 8 // (out_dims * bits) // group * group)
    scales = layer["scales"].dtype

    @functools.cache
    def make() -> tuple[mx.array, mx.array, mx.array, mx.array]:
        keys = mx.random.split(mx.random.key(0), 5)
        shape, u32 = (out_dims, in_dims * bits // 32), mx.uint32
        high, low = (mx.random.randint(0, 1 << 16, shape, u32, key=k) for k in keys[:2])
        w = (high << 16) | low
        size = 2.0 / 2**bits
        s = mx.random.uniform(-size, size, (out_dims, in_dims // group), key=keys[2])
        b = mx.random.uniform(-1.0, 1.0, (out_dims, in_dims // group), key=keys[3])
        xp = mx.random.normal((*x.shape[:-1], in_dims), key=keys[4]).astype(x.dtype)
        arrays = (xp, w, s.astype(scales), b.astype(scales))
        mx.eval(arrays)
        return arrays

    return make


def _qmv_probe(layer: QuantizedLinear, x: mx.array) -> tuple[Callable, Callable]:
    arrays, bits, group = _probe_arrays(layer, x), layer.bits, layer.group_size
    return (
        lambda: qmv.qmv_metal(*arrays(), bits, group),
        lambda: mx.quantized_matmul(*arrays(), True, group, bits),
    )


def _xielu_probe(layer: QuantizedLinear, x: mx.array) -> tuple[Callable, Callable]:
    arrays, bits, group, plan = _probe_arrays(layer, x), layer.bits, layer.group_size, layer.plan
    consts = tuple(mx.array(c, dtype=mx.float32) for c in qmv.XIELU_CONSTANTS)
    return (
        lambda: qmv.qmv_xielu_metal(*arrays(), bits, group, consts),
        lambda: xielu(mx.quantized_matmul(*arrays(), True, group, bits), *consts, plan),
    )


def up_xielu(up: nn.Module, act: Any, x: mx.array) -> mx.array:
    """act(up(x)), the MLP's up-projection and xIELU (`model.XIELU`): one kernel where it
    serves (see the module), else the projection and the activation's own path."""
    fused = isinstance(up, QuantizedLinear) and "bias" not in up
    if fused and up.serves(qmv.QMV_XIELU, x, _xielu_probe):
        return qmv.qmv_xielu_metal(x, *up.packed(), up.bits, up.group_size, act.constants())
    return act(up(x))


def _qkv_probe(
    layer: QuantizedLinear, x: mx.array, head_dim: int, heads: int, kv_heads: int
) -> tuple[Callable, Callable]:
    arrays, bits, group, plan = _probe_arrays(layer, x), layer.bits, layer.group_size, layer.plan
    q_norm, k_norm, inv_freq = qmv.probe_norms(head_dim, x.dtype)
    wavelengths = 1.0 / inv_freq

    def theirs() -> tuple[mx.array, mx.array, mx.array]:
        xp, *packed = arrays()
        B, L, _ = xp.shape
        y = mx.quantized_matmul(xp, *packed, True, group, bits).reshape(B, L, -1, head_dim)
        q, k, v = y[:, :, :heads], y[:, :, heads : heads + kv_heads], y[:, :, heads + kv_heads :]
        rotate = functools.partial(
            qk_rope.fast_norm_rope, eps=1e-5, offset=4096, inv_freq=inv_freq,
            wavelengths=wavelengths, plan=plan,
        )  # fmt: skip
        return rotate(q, q_norm), rotate(k, k_norm), v.transpose(0, 2, 1, 3)

    def ours() -> tuple[mx.array, mx.array, mx.array]:
        return qmv.qkv_norm_rope_metal(
            *arrays(), bits, group, q_norm, k_norm, 1e-5, 4096, inv_freq, heads, kv_heads
        )

    return ours, theirs


def qkv_norm_rope(
    qkv: nn.Module,
    x: mx.array,
    q_norm: nn.Module,
    k_norm: nn.Module,
    rotation: Any,
    heads: int,
    kv_heads: int,
) -> tuple[mx.array, mx.array, mx.array] | None:
    """q, k (RMS-normed per head and rotated) and v, each (B, heads, L, head_dim), from the
    fused projection `qkv` in one kernel where it serves (see the module); else None.

    `rotation` is the forward pass's `model.Rotation` (positions and frequencies).
    """
    if not isinstance(qkv, QuantizedLinear) or "bias" in qkv or x.ndim != 3:
        return None
    head_dim = qkv["weight"].shape[0] // (heads + 2 * kv_heads)
    weights = q_norm.weight, k_norm.weight
    fits = head_dim % 2 == 0 and head_dim <= qmv.MAX_HEAD_DIM and rotation.fast
    fits = fits and all(w.dtype == x.dtype and w.shape == (head_dim,) for w in weights)
    variant = (head_dim, heads, kv_heads)
    if not (fits and qkv.serves(qmv.QKV_ROPE, x, _qkv_probe, *variant)):
        return None
    return qmv.qkv_norm_rope_metal(
        x, *qkv.packed(), qkv.bits, qkv.group_size, *weights, q_norm.eps,
        rotation.position, rotation.inv_freq, heads, kv_heads,
    )  # fmt: skip
