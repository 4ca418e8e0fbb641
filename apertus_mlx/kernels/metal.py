"""When our custom Metal kernels may run, shared by every kernel module."""

from __future__ import annotations

import os

import mlx.core as mx


def on_metal_gpu() -> bool:
    """MLX computes on a Metal GPU (a Mac): where `mx.fast.metal_kernel` kernels can run."""
    return mx.metal.is_available() and mx.default_device() == mx.gpu


def kernels_allowed() -> bool:
    """On a Metal GPU, and not switched off with `APERTUS_MLX_NO_METAL_KERNELS=1`."""
    return os.environ.get("APERTUS_MLX_NO_METAL_KERNELS", "") in ("", "0") and on_metal_gpu()


def failure(error: Exception) -> str:
    """A kernel's failure to build or run, as one log line (Metal errors span many)."""
    first_line = (str(error).strip().splitlines() or [type(error).__name__])[0]
    return f"failed to run ({first_line})"
