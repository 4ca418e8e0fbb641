"""Fused operations: a Metal kernel where the plan allows it, MLX's own path elsewhere.

`xielu.py` and `qk_rope.py` hold element-wise and per-head kernels, `qmv.py` the quantized
matrix-vector kernels of decoding steps and `linear.py` the projections that use them; all
share `metal.py`'s self-checked kernel object. `describe_kernels` says which paths a plan runs.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .qk_rope import (
    fast_norm_rope,
    norm_rope,
    qk_norm_rope,
    qk_rope_backend,
    qk_rope_kernel_usable,
    rope_tables,
)
from .xielu import xielu, xielu_backend, xielu_compiled

if TYPE_CHECKING:
    from ..plan import Plan

__all__ = [
    "describe_kernels",
    "fast_norm_rope",
    "norm_rope",
    "qk_norm_rope",
    "qk_rope_backend",
    "qk_rope_kernel_usable",
    "rope_tables",
    "xielu",
    "xielu_backend",
    "xielu_compiled",
]


def describe_kernels(plan: Plan) -> str:
    """For `--stats`: "xielu metal, qk-norm+rope metal, qmv metal 1.18x, ..." under `plan`.

    The quantized kernels say what their timing chose ("metal 1.18x", "mlx (metal 0.93x)") or
    "mlx (failed its self-check)"; "qmv not run" before any decoding step on quantized weights.
    """
    from .qmv import KERNELS

    parts = [f"xielu {xielu_backend(plan)}", f"qk-norm+rope {qk_rope_backend(plan)}"]
    off = plan.kernels_off()
    if off is not None:
        return ", ".join([*parts, f"qmv mlx ({off})"])
    quantized = []
    for kernel in KERNELS:
        summary = plan.kernels.summary(kernel.label)
        if kernel.disabled is not None:
            quantized.append(f"{kernel.label} mlx (failed its self-check)")
        elif summary is not None:
            quantized.append(f"{kernel.label} {summary}")
    return ", ".join([*parts, *(quantized or ["qmv not run"])])
