"""Tensor parallel: every rank holds a slice of every layer, and all of them compute each
token together.

Each layer's attention heads and MLP columns are divided among the ranks (Megatron's split):
q, k, v and up keep their rows for this rank's heads and columns (all to sharded: the full
input, a slice of the output), o and down keep the matching columns of their input (sharded to
all: a slice in, a partial sum out, added up across the ranks with `mx.distributed.all_sum`).
Two sums per layer; the embedding, the norms and the head stay whole on every rank, so every
rank ends a step with the same logits and, with the same sampler and seed, the same token.

Against the pipeline (`pipeline.py`), every rank works on every token: the decode rate can grow
with the ranks where the link is fast (Thunderbolt with RDMA, MLX's JACCL backend), while each
step waits on 2 x layers sums; over TCP the pipeline's one hand-over per rank and step is the
better trade (`benchmarks/distributed.py` measures both).

Only where the heads and the MLP divide evenly, and for quantized weights where each rank's
share of o's and down's input is whole quantization groups.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import mlx.core as mx
import mlx.nn as nn

from .errors import UsageError


class SumAcross(nn.Module):
    """A projection over this rank's slice of the input, summed across the ranks."""

    def __init__(self, part: nn.Module, group: mx.distributed.Group):
        super().__init__()
        self.part = part
        self.group = group

    def __call__(self, x: mx.array) -> mx.array:
        return mx.distributed.all_sum(self.part(x), group=self.group)


def shard(model, group: mx.distributed.Group) -> None:
    """Keep this rank's slice of every layer of `model` (unfused) and sum the partial outputs
    across `group`. `model.args` then describes the slice (its heads and MLP width), which is
    what the KV cache and the speed estimates need. `load(path, tensor_group=group)` calls it
    while the weights are still unread, so no rank ever holds the whole model."""
    n, rank = group.size(), group.rank()
    a = model.args
    problems = [
        f"{name} ({value}) does not divide by {n} ranks"
        for name, value in (
            ("num_attention_heads", a.num_attention_heads),
            ("num_key_value_heads", a.num_key_value_heads),
            ("intermediate_size", a.intermediate_size),
        )
        if value % n
    ]
    if problems:
        raise UsageError("tensor parallel: " + "; ".join(problems))
    for layer in model.model.layers:
        attn, mlp = layer.self_attn, layer.mlp
        if attn.fused:
            raise UsageError("tensor parallel needs q, k and v apart: load(..., fuse=False)")
        for proj in (attn.q_proj, attn.k_proj, attn.v_proj, mlp.up_proj):
            _keep_rows(proj, n, rank)
        attn.o_proj = SumAcross(_keep_columns(attn.o_proj, n, rank), group)
        mlp.down_proj = SumAcross(_keep_columns(mlp.down_proj, n, rank), group)
        attn.n_heads //= n
        attn.n_kv_heads //= n
    model.args = dataclasses.replace(
        a,
        num_attention_heads=a.num_attention_heads // n,
        num_key_value_heads=a.num_key_value_heads // n,
        intermediate_size=a.intermediate_size // n,
    )
    model.tensor_group = group
    _agree_on_randomness(group)


def _agree_on_randomness(group: mx.distributed.Group) -> None:
    """Every rank seeds MLX's global generator alike (rank 0's draw), so answers sampled
    without a seed of their own draw the same tokens everywhere and the ranks stay in step."""
    import secrets

    mine = secrets.randbits(31) if group.rank() == 0 else 0
    seed = mx.distributed.all_sum(mx.array(mine, dtype=mx.int32), group=group, stream=mx.cpu)
    mx.random.seed(int(seed.item()))


def _keep_rows(proj: nn.Module, n: int, rank: int) -> None:
    """This rank's output rows (quantization groups run along a row: rows slice cleanly)."""
    for name in _arrays(proj, ("weight", "scales", "biases", "bias")):
        x = proj[name]
        rows = x.shape[0] // n
        setattr(proj, name, mx.contiguous(x[rank * rows : (rank + 1) * rows]))


def _keep_columns(proj: nn.Module, n: int, rank: int) -> nn.Module:
    """This rank's input columns; a bias is added once, on rank 0."""
    quantized = isinstance(proj, nn.QuantizedLinear)
    if quantized:
        inputs = proj["scales"].shape[1] * proj.group_size
        if (inputs // n) % proj.group_size:
            raise UsageError(
                f"tensor parallel: {inputs // n} inputs per rank are not whole groups of "
                f"{proj.group_size} quantized weights"
            )
    for name in _arrays(proj, ("weight", "scales", "biases")):
        x = proj[name]
        cols = x.shape[1] // n
        setattr(proj, name, mx.contiguous(x[:, rank * cols : (rank + 1) * cols]))
    if "bias" in proj and rank:
        proj.bias = mx.zeros_like(proj.bias)
    return proj


def _arrays(proj: nn.Module, names: Sequence[str]) -> list[str]:
    return [name for name in names if name in proj]
