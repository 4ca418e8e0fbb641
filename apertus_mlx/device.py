"""Metal essentials for generation, as mlx-lm does them: its own stream, weights kept wired.

On a Mac, macOS may page a large model's weights out of GPU memory between tokens unless the
wired-memory limit covers them; `wired_limit` raises it for the duration of a generation
(to the device's recommended working set) and puts the old value back. Generation runs on a
stream of its own so that it never queues behind other work of the process. Neither applies
to the CPU backend, where both are no-ops. Whether MLX computes on Metal is the plan's answer
(`Plan.on_gpu`), not asked again here.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import mlx.core as mx
from mlx.utils import tree_reduce

from .plan import Plan

logger = logging.getLogger("apertus_mlx")


def generation_stream(plan: Plan) -> Any:
    """The stream generation runs on (the model's plan says whether a GPU computes): one per
    thread (a chat's model thread has its own)."""
    return _stream(plan.on_gpu)


@functools.cache
def _stream(on_gpu: bool) -> Any:
    if not on_gpu:
        return mx.default_device()  # as a stream context: the calling thread's default stream
    return mx.new_thread_local_stream(mx.default_device())


def model_bytes(model) -> int:
    return tree_reduce(lambda total, a: total + a.nbytes, model.parameters(), 0)


@contextmanager
def wired_limit(model) -> Iterator[None]:
    """Keep the model's weights wired while generating (Metal only); restore the limit after."""
    if not model.plan.on_gpu:
        yield
        return
    size = model_bytes(model)
    recommended = mx.device_info().get("max_recommended_working_set_size")
    if recommended is None:
        yield
        return
    if size > 0.9 * recommended:
        logger.warning(
            "the model needs %.1f GB, close to the %.1f GB this Mac can keep in GPU memory: "
            "generation may be slow",
            size / 1e9,
            recommended / 1e9,
        )
    old = mx.set_wired_limit(recommended)
    try:
        yield
    finally:
        mx.synchronize(generation_stream(model.plan))
        mx.set_wired_limit(old)
