"""The one machinery every custom Metal kernel uses: built once, self-checked, timed, recorded.

A kernel here is an `mx.fast.metal_kernel` whose text sticks to built-ins a C++ compiler also
accepts given a small header of stand-ins (tests/stand_in_metal.h), so machines without Metal
compile and run it with g++ in the tests (docs/metal-kernels.md).

Whether a kernel may run at all is the plan's decision (`Plan.metal_kernels`, made once at
load): callers ask the plan first and this module never looks at the device or the
environment. Given that, `SelfCheckedKernel` compares the kernel with its reference on first
use of each variant; on any failure it logs one line and leaves the work to the caller's
fallback for good, since a wrong kernel must not cost an answer. Kernels that replace one of
MLX's own paths are also timed against it (`faster`) and used only where they win, since a
slower kernel must not cost speed either; the outcome goes into the plan's `KernelRecord`.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Hashable, Sequence
from typing import TYPE_CHECKING, Any

import mlx.core as mx

if TYPE_CHECKING:
    from ..plan import KernelRecord, Plan

logger = logging.getLogger("apertus_mlx")

MIN_SPEEDUP = 1.05  # a timed kernel replaces MLX's path only if it takes at most 1/1.05 the time


def failure(error: Exception) -> str:
    """A kernel's failure to build or run, as one log line (Metal errors span many)."""
    first_line = (str(error).strip().splitlines() or [type(error).__name__])[0]
    return f"failed to run ({first_line})"


def seconds_per_call(fn: Callable[[], Any], calls: int = 16) -> float:
    """What one call of `fn` costs inside a decode step: `calls` launches queued as one graph
    (as a step queues its kernels), evaluated together; the best of three rounds."""
    best = math.inf
    for _ in range(3):
        start = time.perf_counter()
        mx.eval([fn() for _ in range(calls)])
        best = min(best, (time.perf_counter() - start) / calls)
    return best


def time_both(ours: Callable[[], Any], theirs: Callable[[], Any]) -> tuple[float, float]:
    """Seconds per call of our kernel and of MLX's path, measured alternately after a warm-up
    (which compiles both), so that a busy moment does not favour one side."""
    mx.eval(ours(), theirs())
    ours_s = theirs_s = math.inf
    for _ in range(3):
        ours_s = min(ours_s, seconds_per_call(ours))
        theirs_s = min(theirs_s, seconds_per_call(theirs))
    return ours_s, theirs_s


class SelfCheckedKernel:
    """One Metal kernel: built once, self-checked once per variant, disabled for good on failure.

    `geometry(shape, dtype, **params)` returns every launch argument that depends on the first
    input (and on `params`, for kernels whose launch depends on more than that input);
    `self_check(dtype, *variant)` runs the kernel on a probe and says whether it agrees with the
    reference. `fallback` names the other path for `--stats`; `fallback_note` ends the log line.
    """

    def __init__(
        self,
        *,
        label: str,
        name: str,
        input_names: Sequence[str],
        source: str,
        header: str,
        geometry: Callable[..., dict[str, Any]],
        self_check: Callable[..., bool],
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
        """Forget every decision (for tests): not built, nothing checked or timed, not disabled."""
        self._object: Any = None
        self._checked: set[tuple] = set()
        self._timed: dict[Hashable, tuple[float, float]] = {}
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

    def __call__(self, inputs: Sequence[mx.array], **params: Any) -> list[mx.array]:
        """Launch on `inputs`; MLX compiles one instance per template on first launch."""
        if self._object is None:
            self._object = self._make()
        x = inputs[0]
        return self._object(inputs=list(inputs), **self.geometry(x.shape, x.dtype, **params))

    def _disable(self, problem: str) -> None:
        self.disabled = problem
        logger.warning("%s Metal kernel %s; using %s", self.label, problem, self.fallback_note)

    def usable(self, dtype: mx.Dtype, *variant: Hashable) -> bool:
        """May the kernel run on `dtype` (and `variant`: what else selects its instance)?

        Self-checks on the first use of each; the caller has asked the plan already.
        """
        if dtype not in self.dtypes or self.disabled is not None:
            return False
        key = (dtype, *variant)
        if key not in self._checked:
            try:
                ok = self.self_check(dtype, *variant)
            except Exception as error:  # a Metal compile error surfaces here as a RuntimeError
                problem: str | None = failure(error)
            else:
                problem = None if ok else f"disagrees with the reference for {_name(key)}"
            if problem is not None:
                self._disable(problem)
                return False
            self._checked.add(key)
        return True

    def faster(
        self,
        key: Hashable,
        probe: Callable[[], tuple[Callable[[], Any], Callable[[], Any]]],
        record: KernelRecord,
    ) -> bool:
        """Is the kernel at least `MIN_SPEEDUP` times as fast as MLX's path on the shape `key`
        stands for? `probe()` gives (ours, theirs), thunks running each on fresh arrays of that
        shape; it is called only to time, once per key. The outcome is noted in `record`."""
        if self.disabled is not None:
            return False
        if key not in self._timed:
            try:
                self._timed[key] = time_both(*probe())
            except Exception as error:
                self._disable(failure(error))
                return False
        ours_s, theirs_s = self._timed[key]
        used = theirs_s >= MIN_SPEEDUP * ours_s
        record.note(self.label, key, ours_s, theirs_s, used)
        return used

    def status(self, plan: Plan) -> str:
        """For `--stats`: "metal", or the fallback's name. "metal" until a self-check fails."""
        return "metal" if plan.metal_kernels and self.disabled is None else self.fallback


def _name(key: tuple) -> str:
    return ", ".join(str(k).removeprefix("mlx.core.") for k in key)
