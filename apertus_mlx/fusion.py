"""q, k and v as one projection, fused while the checkpoint's tensors are mapped.

The three projections read the same input, so one matmul over their concatenated weights
replaces three (quantized ones too, when they share bits, group size and mode). This happens
on the tensor dictionary before the model is built, like the rest of `loading.sanitize`: a
built model is never rewired.
"""

from __future__ import annotations

from typing import Any

import mlx.core as mx

PARTS = ("q_proj", "k_proj", "v_proj")
TENSORS = ("weight", "scales", "biases", "bias")


def _layers(weights: dict[str, mx.array]) -> list[str]:
    """Attention module paths that have q/k/v projections."""
    suffix = ".q_proj.weight"
    return sorted(k[: -len(suffix)] for k in weights if k.endswith(suffix))


def _signature(weights: dict[str, mx.array], quant: dict[str, Any] | None, path: str) -> tuple:
    """What must agree between q, k and v for one matmul to stand for the three."""
    tensors = tuple(name for name in TENSORS if f"{path}.{name}" in weights)
    override = (quant or {}).get(path)
    return tensors, repr(override), weights[f"{path}.weight"].dtype


def can_fuse(weights: dict[str, mx.array], quant: dict[str, Any] | None) -> bool:
    """Every layer's q, k and v stored alike (same tensors, dtype, quantization)."""
    layers = _layers(weights)
    return bool(layers) and all(
        len({_signature(weights, quant, f"{attn}.{p}") for p in PARTS}) == 1 for attn in layers
    )


def fuse_qkv(
    weights: dict[str, mx.array], quant: dict[str, Any] | None
) -> tuple[dict[str, mx.array], dict[str, Any] | None]:
    """`qkv_proj.*` tensors in place of q/k/v's, and the quantization block to match."""
    out = dict(weights)
    quant = dict(quant) if quant is not None else None
    for attn in _layers(weights):
        paths = [f"{attn}.{p}" for p in PARTS]
        for name in TENSORS:
            keys = [f"{path}.{name}" for path in paths]
            if keys[0] in out:
                out[f"{attn}.qkv_proj.{name}"] = mx.concatenate([out.pop(k) for k in keys], axis=0)
        if quant is not None and paths[0] in quant:
            quant[f"{attn}.qkv_proj"] = quant[paths[0]]
            for path in paths:
                quant.pop(path)
    return out, quant
