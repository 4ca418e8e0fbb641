"""The execution plan: every backend decision, made once at load and handed to the model.

A reader of `model.py` never has to ask "which path runs here?" at a call site: the modules
are built for one plan. The plan is frozen; the only thing that can still change at run time
is a Metal kernel failing its self-check on first use, which hands its work to the fallback
for good (see `kernels/`), and `describe()` reports that too.
"""

from __future__ import annotations

from dataclasses import dataclass

import mlx.core as mx

DTYPES = {"bfloat16": mx.bfloat16, "float16": mx.float16, "float32": mx.float32}


@dataclass(frozen=True)
class Plan:
    on_gpu: bool  # MLX computes on a Metal GPU (a Mac)
    dtype: mx.Dtype  # activations, float weights and the KV cache
    fast_ops: bool  # mx.fast RMSNorm and RoPE (one Metal kernel each) vs plain fusable ops
    metal_kernels: bool  # our Metal kernels (xIELU, QK-norm+RoPE), self-checked on first use
    fuse_qkv: bool  # q, k and v as one matmul, their weights concatenated while loading

    def describe(self) -> str:
        """One line for `--stats` and `--json`: what this run computes with."""
        from .kernels import qk_rope_backend, xielu_backend

        device = "metal" if self.on_gpu else "cpu"
        dtype = str(self.dtype).removeprefix("mlx.core.")
        kernels = f"xielu {xielu_backend()}, qk-norm+rope {qk_rope_backend()}"
        fused = ", fused qkv" if self.fuse_qkv else ""
        return f"{device}, {dtype} activations, {kernels}{fused}"


def check_dtype(requested: object) -> None:
    """Refuse a dtype we cannot compute in, before any weight is read."""
    if requested is None or requested in DTYPES.values():
        return
    if not isinstance(requested, str) or requested not in DTYPES:
        from .errors import UsageError

        raise UsageError(f"unknown dtype {requested!r}: choose one of {', '.join(DTYPES)}")


def compute_dtype(requested: mx.Dtype | str | None, stored: mx.Dtype, on_gpu: bool) -> mx.Dtype:
    """What the model computes in: as asked, else what the backend is fast at.

    MLX's CPU backend runs float32 matmuls (dense and quantized) many times faster than
    bfloat16 ones; Metal is fastest in the checkpoint's own dtype.
    """
    check_dtype(requested)
    if isinstance(requested, str):
        requested = DTYPES[requested]
    if requested is not None:
        return requested
    return stored if on_gpu else mx.float32


def make_plan(stored: mx.Dtype, dtype: mx.Dtype | str | None = None, fuse: bool = True) -> Plan:
    """The plan for this machine and a checkpoint stored in `stored`."""
    from .kernels.metal import kernels_allowed

    on_gpu = mx.default_device() == mx.gpu and mx.metal.is_available()
    return Plan(
        on_gpu=on_gpu,
        dtype=compute_dtype(dtype, stored, on_gpu),
        fast_ops=on_gpu,
        metal_kernels=on_gpu and kernels_allowed(),
        fuse_qkv=fuse,
    )
