"""Fused operations: a Metal kernel where the plan allows it, MLX's own path elsewhere.

`xielu.py` and `qk_rope.py` hold element-wise and per-head kernels; both share `metal.py`'s
self-checked kernel object. `describe_kernels` says which paths a plan runs.
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
    """For `--stats`: "xielu metal, qk-norm+rope metal" under `plan`."""
    return f"xielu {xielu_backend(plan)}, qk-norm+rope {qk_rope_backend(plan)}"
