"""Fused operations: a Metal kernel where Metal is available, an mx.compile path elsewhere."""

from .qk_rope import (
    norm_rope,
    qk_norm_rope,
    qk_rope_backend,
    qk_rope_kernel_usable,
    rope_tables,
)
from .xielu import xielu, xielu_backend, xielu_compiled

__all__ = [
    "norm_rope",
    "qk_norm_rope",
    "qk_rope_backend",
    "qk_rope_kernel_usable",
    "rope_tables",
    "xielu",
    "xielu_backend",
    "xielu_compiled",
]
