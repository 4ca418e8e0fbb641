"""Load-time fusions that change how the model computes, never what.

q, k and v read the same input, so one matmul over their concatenated weights replaces
three (quantized ones too, when they share bits, group size and mode).
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn


def _fused(q: nn.Module, k: nn.Module, v: nn.Module) -> nn.Module | None:
    parts = (q, k, v)
    bias = "bias" in q
    if any(("bias" in p) != bias for p in parts):
        return None
    if all(type(p) is nn.Linear for p in parts):
        fused = nn.Linear(1, 1, bias=bias)
    elif all(type(p) is nn.QuantizedLinear for p in parts):
        if len({(p.group_size, p.bits, p.mode) for p in parts}) != 1:
            return None
        g = q.group_size
        fused = nn.QuantizedLinear(g, g, bias=bias, group_size=g, bits=q.bits, mode=q.mode)
    else:
        return None
    for name in ("weight", "scales", "biases", "bias"):
        if name in q:
            setattr(fused, name, mx.concatenate([p[name] for p in parts], axis=0))
    return fused


def fuse_qkv(model: nn.Module) -> int:
    """Replace q/k/v projections with one `qkv_proj` where possible; return how many."""
    count = 0
    for layer in model.layers:
        attn = layer.self_attn
        fused = _fused(attn.q_proj, attn.k_proj, attn.v_proj)
        if fused is None:
            continue
        attn.qkv_proj = fused
        for name in ("q_proj", "k_proj", "v_proj"):
            del attn[name]
        count += 1
    mx.eval(model.parameters())
    return count
