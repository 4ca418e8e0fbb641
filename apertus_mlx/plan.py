"""The execution plan: every backend decision, made once at load and handed to the model.

A reader of `model.py` never has to ask "which path runs here?" at a call site: the modules
are built for one plan. The plan is frozen and is the one place that answers "on a Metal GPU?"
(`Plan.on_gpu`, from `metal_gpu()`) and "may our Metal kernels run?" (`Plan.metal_kernels`,
which reads `APERTUS_MLX_NO_METAL_KERNELS` once, here). What can still happen at run time is
recorded, not decided again: a kernel failing its self-check hands its work to the fallback
for good (see `kernels/`), and a kernel timed against MLX's own path is used only where it
wins; `Plan.kernels` keeps those outcomes and `describe()` reports them.
"""

from __future__ import annotations

import os
from collections.abc import Hashable, Mapping
from dataclasses import dataclass, field

import mlx.core as mx

DTYPES = {"bfloat16": mx.bfloat16, "float16": mx.float16, "float32": mx.float32}
KERNELS_SWITCH = "APERTUS_MLX_NO_METAL_KERNELS"  # set to 1: MLX's own paths everywhere


@dataclass(frozen=True)
class KernelTiming:
    """One timed kernel on one shape: seconds per call, ours and MLX's, and the choice made."""

    ours_s: float
    theirs_s: float
    used: bool

    @property
    def speedup(self) -> float:
        return self.theirs_s / self.ours_s if self.ours_s > 0 else 0.0


class KernelRecord:
    """What the timed Metal kernels chose while this plan's model ran, per kernel and shape.

    Filled at run time by the kernels (`SelfCheckedKernel.faster`), read by `Plan.describe`.
    """

    def __init__(self) -> None:
        self.timings: dict[str, dict[Hashable, KernelTiming]] = {}

    def note(self, label: str, key: Hashable, ours_s: float, theirs_s: float, used: bool) -> None:
        self.timings.setdefault(label, {})[key] = KernelTiming(ours_s, theirs_s, used)

    def summary(self, label: str) -> str | None:
        """ "metal 1.18x", "mlx (metal 0.93x)" or "metal 1.10x on 2 of 3 shapes"; None if
        the kernel was never timed. The speed-up is MLX's time over ours, summed over shapes."""
        timings = list(self.timings.get(label, {}).values())
        if not timings:
            return None
        used = [t for t in timings if t.used]
        shown = used or timings
        speedup = sum(t.theirs_s for t in shown) / max(sum(t.ours_s for t in shown), 1e-12)
        if not used:
            return f"mlx (metal {speedup:.2f}x)"
        if len(used) < len(timings):
            return f"metal {speedup:.2f}x on {len(used)} of {len(timings)} shapes"
        return f"metal {speedup:.2f}x"


@dataclass(frozen=True)
class Plan:
    on_gpu: bool  # MLX computes on a Metal GPU (a Mac): ask this, never the device again
    dtype: mx.Dtype  # activations and float weights
    fast_ops: bool  # mx.fast RMSNorm and RoPE (one Metal kernel each) vs plain fusable ops
    metal_kernels: bool  # our Metal kernels may run (self-checked, some also timed, on first use)
    fuse_qkv: bool  # q, k and v as one matmul, their weights concatenated while loading
    # The KV cache's keys and values (attention reads them as they are: MLX mixes types).
    kv_dtype: mx.Dtype | None = None  # None: the activations' dtype
    # What the kernels decided at run time (shared by copies of the plan; not part of equality).
    kernels: KernelRecord = field(default_factory=KernelRecord, compare=False, repr=False)

    @property
    def cache_dtype(self) -> mx.Dtype:
        return self.kv_dtype or self.dtype

    def kernels_off(self) -> str | None:
        """Why our Metal kernels do not run at all, or None when they may."""
        if self.metal_kernels:
            return None
        return "no Metal GPU" if not self.on_gpu else f"{KERNELS_SWITCH}=1"

    def describe(self) -> str:
        """One line for `--stats` and `--json`: what this run computes with."""
        from .kernels import describe_kernels

        device = "metal" if self.on_gpu else "cpu"
        dtype = str(self.dtype).removeprefix("mlx.core.")
        kv = str(self.cache_dtype).removeprefix("mlx.core.")
        fused = ", fused qkv" if self.fuse_qkv else ""
        return f"{device}, {dtype} activations, {kv} KV, {describe_kernels(self)}{fused}"


def metal_gpu() -> bool:
    """Does MLX compute on a Metal GPU here? Asked once per plan; everything else asks the plan."""
    return mx.default_device() == mx.gpu and mx.metal.is_available()


def kernels_switched_off(environ: Mapping[str, str] | None = None) -> bool:
    """`APERTUS_MLX_NO_METAL_KERNELS` set to anything but "" or "0"."""
    return (os.environ if environ is None else environ).get(KERNELS_SWITCH, "") not in ("", "0")


def check_dtype(requested: object) -> None:
    """Refuse a dtype we cannot compute in, before any weight is read."""
    if requested is None or requested in DTYPES.values():
        return
    if not isinstance(requested, str) or requested not in DTYPES:
        from .errors import UsageError

        raise UsageError(f"unknown dtype {requested!r}: choose one of {', '.join(DTYPES)}")


def compute_dtype(
    requested: mx.Dtype | str | None, stored: mx.Dtype, on_gpu: bool, quantized: bool = False
) -> mx.Dtype:
    """What the model computes in: as asked, else what the backend is fast at.

    Metal is fastest in the checkpoint's own dtype. MLX's CPU backend is measured (make bench,
    docs/architecture.md): its quantized matmuls are about 10x faster with float32
    activations than with bfloat16 ones, while dense bfloat16 matmuls are about 2x faster
    than float32 at prompt sizes, as fast for one token, and read half the bytes. So on the
    CPU: float32 for quantized checkpoints, a dense bfloat16 checkpoint's own dtype, float32
    for the rest (float16 matmuls are slow there; float32 holds float16 weights exactly).
    """
    check_dtype(requested)
    if isinstance(requested, str):
        requested = DTYPES[requested]
    if requested is not None:
        return requested
    if on_gpu or (stored == mx.bfloat16 and not quantized):
        return stored
    return mx.float32


def cache_dtype(requested: object, compute: mx.Dtype, stored: mx.Dtype) -> mx.Dtype | None:
    """The KV cache's dtype: the checkpoint's own where it is narrower than the activations
    (a quantized checkpoint's bfloat16 on the CPU: half the memory of float32 buffers, as
    mlx-lm keeps them), else the activations'. A dtype asked for applies to the cache too."""
    if requested is not None or compute == stored:
        return None
    if not mx.issubdtype(stored, mx.floating) or stored.size >= compute.size:
        return None
    return stored


def make_plan(
    stored: mx.Dtype,
    dtype: mx.Dtype | str | None = None,
    fuse: bool = True,
    environ: Mapping[str, str] | None = None,
    quantized: bool = False,
) -> Plan:
    """The plan for this machine and a checkpoint stored in `stored` (quantized or not);
    `environ` (default: the process's) is read here and nowhere else."""
    on_gpu = metal_gpu()
    compute = compute_dtype(dtype, stored, on_gpu, quantized)
    return Plan(
        on_gpu=on_gpu,
        dtype=compute,
        fast_ops=on_gpu,
        metal_kernels=on_gpu and not kernels_switched_off(environ),
        fuse_qkv=fuse,
        kv_dtype=cache_dtype(dtype, compute, stored),
    )
