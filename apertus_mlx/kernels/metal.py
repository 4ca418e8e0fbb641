"""Where our custom Metal kernels may run, and the one machinery every kernel module uses.

A kernel here is an `mx.fast.metal_kernel` whose text sticks to built-ins a C++ compiler also
accepts given a small header of stand-ins (tests/stand_in_metal.h), so machines without Metal
compile and run it with g++ in the tests (docs/metal-kernels.md). On a Mac, `SelfCheckedKernel`
compares it with its reference on first use per dtype; on any failure it logs one line and
leaves the work to the module's fallback for good, since a wrong kernel must not cost an answer.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence
from typing import Any

import mlx.core as mx

logger = logging.getLogger("apertus_mlx")


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


class SelfCheckedKernel:
    """One Metal kernel: built once, self-checked once per dtype, disabled for good on failure.

    `geometry(shape, dtype)` returns every launch argument that depends on the first input;
    `self_check(dtype)` runs the kernel on a probe and says whether it agrees with the reference.
    `fallback` names the other path for `--stats`; `fallback_note` ends the log line.
    """

    def __init__(
        self,
        *,
        label: str,
        name: str,
        input_names: Sequence[str],
        source: str,
        header: str,
        geometry: Callable[[tuple[int, ...], mx.Dtype], dict[str, Any]],
        self_check: Callable[[mx.Dtype], bool],
        fallback: str,
        fallback_note: str,
        output_names: Sequence[str] = ("out",),
        dtypes: Sequence[mx.Dtype] = (mx.float32, mx.float16, mx.bfloat16),
        ensure_row_contiguous: bool = True,
    ) -> None:
        self.label, self.name = label, name
        self.input_names, self.output_names = tuple(input_names), tuple(output_names)
        self.source, self.header = source, header
        self.geometry, self.self_check = geometry, self_check
        self.dtypes = tuple(dtypes)
        self.fallback, self.fallback_note = fallback, fallback_note
        self.ensure_row_contiguous = ensure_row_contiguous
        self.reset()

    def reset(self) -> None:
        """Forget every decision (for tests): not built, no dtype checked, not disabled."""
        self._object: Any = None
        self._checked: set[mx.Dtype] = set()
        self.disabled: str | None = None  # why the kernel is off for good, once decided

    def _make(self) -> Any:
        return mx.fast.metal_kernel(
            name=self.name,
            input_names=list(self.input_names),
            output_names=list(self.output_names),
            source=self.source,
            header=self.header,
            ensure_row_contiguous=self.ensure_row_contiguous,
        )

    def __call__(self, inputs: Sequence[mx.array]) -> list[mx.array]:
        """Launch on `inputs`; MLX compiles one instance per element type on first launch."""
        if self._object is None:
            self._object = self._make()
        x = inputs[0]
        return self._object(inputs=list(inputs), **self.geometry(x.shape, x.dtype))

    def possible(self) -> bool:
        """Metal kernels allowed here and this one not disabled (dtypes not yet checked)."""
        return self.disabled is None and kernels_allowed()

    def usable(self, dtype: mx.Dtype) -> bool:
        """May the kernel run on `dtype`? Self-checks on the first use of each dtype."""
        if dtype not in self.dtypes or not self.possible():
            return False
        if dtype not in self._checked:
            try:
                ok = self.self_check(dtype)
            except Exception as error:  # a Metal compile error surfaces here as a RuntimeError
                problem: str | None = failure(error)
            else:
                problem = None if ok else f"disagrees with the reference for {dtype}"
            if problem is not None:
                self.disabled = problem
                note = self.fallback_note
                logger.warning("%s Metal kernel %s; using %s", self.label, problem, note)
                return False
            self._checked.add(dtype)
        return True

    def status(self) -> str:
        """For `--stats`: "metal", or the fallback's name. "metal" until a self-check fails."""
        return "metal" if self.possible() else self.fallback
