"""What every rank checks and agrees on when a model is loaded, before any weight is read.

Each rank states its host, apertus-mlx and MLX versions, the checkpoint's identity digest (as
its own copy resolves the name), the dtype it would compute in and its memory; every rank sees
every statement (`Cluster.exchange`) and decides alike, so a refusal leaves all of them ready
for rank 0's next message, and the split (`placement.plan_parts`) needs no telling.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import TYPE_CHECKING, Any

import mlx.core as mx

from .device import model_bytes
from .errors import ApertusError, CheckpointError, UsageError

if TYPE_CHECKING:
    from .distributed import Cluster
    from .model import Model, Part


@dataclasses.dataclass
class Agreement:
    """What every rank agreed on at a load: who holds which layers, in what dtype."""

    parts: list[Part]
    dtype: str
    hosts: list[str]


def negotiate(
    cluster: Cluster, path: Path | None, dtype: str | None, split: list[int] | None,
    problem: ApertusError | None = None,
) -> Agreement | ApertusError:  # fmt: skip
    """Run on every rank at a load: exchange identities, refuse a mismatch, plan the split.

    Every rank sees every record and decides alike, so a refused load leaves all of them
    ready for the next message. Returns the agreement, or the error that refuses it (rank 0
    raises it; the others wait for what rank 0 does next).
    """
    from . import __version__
    from .placement import footprint, memory_bytes, plan_parts
    from .plan import compute_dtype, metal_gpu

    record: dict[str, Any] = {"host": cluster.host, "version": f"{__version__}/{mx.__version__}"}
    fp = None
    if problem is None and path is not None:
        try:
            fp = footprint(path)
            compute = compute_dtype(dtype, getattr(mx, fp.stored), metal_gpu())
            record.update(checkpoint=fp.digest, dtype=str(compute).removeprefix("mlx.core."),
                          memory=memory_bytes())  # fmt: skip
        except ApertusError as e:
            problem = e
    if problem is not None:
        record.update(error=str(problem), code=problem.exit_code)
    records = cluster.exchange(record)
    cluster.hosts = [r["host"] for r in records]
    first = records[0]
    for rank, r in enumerate(records):
        where = cluster.host_of(rank)
        if r.get("error"):
            return _remote_error(f"{where}: {r['error']}", r.get("code", 1))
        if r["version"] != first["version"]:
            return _mismatch(
                f"{where} runs apertus-mlx/mlx {r['version']}, {cluster.host_of(0)} "
                f"{first['version']}: install the same version on every host"
            )
        if r["checkpoint"] != first["checkpoint"]:
            return _mismatch(
                f"{where} holds another checkpoint than {cluster.host_of(0)} "
                "(config.json or tensors differ): copy the same one to every host"
            )
        if r["dtype"] != first["dtype"]:
            return _mismatch(f"{where} would compute in {r['dtype']}, {cluster.host_of(0)} in "
                             f"{first['dtype']}: choose one with --dtype")  # fmt: skip
    try:
        parts = plan_parts(fp, [r["memory"] for r in records], split)
    except UsageError as e:
        return e
    return Agreement(parts, first["dtype"], cluster.hosts)


def _mismatch(message: str) -> ApertusError:
    from .distributed import ClusterMismatchError

    return ClusterMismatchError(message)


def _remote_error(message: str, code: int) -> ApertusError:
    error = CheckpointError(message) if code == 2 else ApertusError(message)
    return error


def ready(
    cluster: Cluster, model: Model | None, problem: ApertusError | None
) -> ApertusError | None:
    """After each rank loaded its part: everyone's outcome, the first failure as an error."""
    record = {"error": str(problem), "code": problem.exit_code} if problem else {}
    for rank, r in enumerate(cluster.exchange(record)):
        if r.get("error"):
            return _remote_error(f"{cluster.host_of(rank)}: {r['error']}", r.get("code", 1))
    return None


def describe(cluster: Cluster, model: Model | None) -> dict:
    """What this rank holds, for `Pipeline.ranks()`."""
    part = model.part if model is not None else None
    return {
        "rank": cluster.rank,
        "host": cluster.host,
        "layers": [part.start, part.stop] if part else None,
        "parameter_bytes": model_bytes(model) if model is not None else 0,
        "active_memory": mx.get_active_memory(),
        "peak_memory": mx.get_peak_memory(),
    }
