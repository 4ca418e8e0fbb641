"""The KV cache: keys and values of every layer, kept across calls and across chat turns.

Buffers are preallocated, (batch, kv_heads, capacity, head_dim) per layer, and grow in steps of
`step` positions. A forward pass writes its new keys and values in place with
`mx.slice_update` at the cache's position, given to it as an array (`KVBuffers`), and
attention masks the unused tail: so one compiled graph serves every position until the
buffers grow, whether it reads a prompt chunk, one token or a block of drafted tokens.
`trim` keeps a prefix, which is how a chat reuses the turns it has already seen and how
speculative decoding drops rejected drafts.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import mlx.core as mx

DEFAULT_STEP = 256


@dataclass
class KVBuffers:
    """What one forward pass reads and writes: every layer's buffers and where to write."""

    keys: list[mx.array]
    values: list[mx.array]
    position: mx.array  # (1,) int32: the first position this pass writes

    def write(self, layer: int, keys: mx.array, values: mx.array) -> tuple[mx.array, mx.array]:
        """Store (B, kv_heads, L, head_dim) at `position`; return the layer's whole buffers."""
        self.keys[layer] = mx.slice_update(self.keys[layer], keys, self.position, axes=(2,))
        self.values[layer] = mx.slice_update(self.values[layer], values, self.position, axes=(2,))
        return self.keys[layer], self.values[layer]

    def mask(self, length: int) -> mx.array:
        """(length, capacity): query i sees positions up to position + i, nothing after."""
        capacity = self.keys[0].shape[2]
        last = self.position + mx.arange(length, dtype=mx.int32)
        return mx.arange(capacity, dtype=mx.int32)[None, :] <= last[:, None]


class KVCache:
    def __init__(
        self,
        num_layers: int,
        kv_heads: int,
        head_dim: int,
        dtype: mx.Dtype,
        batch: int = 1,
        step: int = DEFAULT_STEP,
    ):
        self.shape = (batch, kv_heads, 0, head_dim)
        self.dtype = dtype
        self.step = step
        self.keys = [mx.zeros(self.shape, dtype=dtype) for _ in range(num_layers)]
        self.values = [mx.zeros(self.shape, dtype=dtype) for _ in range(num_layers)]
        self.offset = 0  # positions filled

    @property
    def num_layers(self) -> int:
        return len(self.keys)

    @property
    def capacity(self) -> int:
        return self.keys[0].shape[2]

    def run(self, forward: Callable[[mx.array, KVBuffers], mx.array], inputs: mx.array):
        """Run `forward(inputs, buffers)` after the filled positions; keep what it wrote."""
        length = inputs.shape[1]
        self.reserve(self.offset + length)
        position = mx.array([self.offset], dtype=mx.int32)
        kv = KVBuffers(list(self.keys), list(self.values), position)
        out = forward(inputs, kv)
        self.keys, self.values = kv.keys, kv.values
        self.offset += length
        return out

    def reserve(self, needed: int) -> None:
        """Grow every layer's buffers to hold `needed` positions (a multiple of `step`)."""
        if needed <= self.capacity:
            return
        size = -(-needed // self.step) * self.step
        B, H, _, D = self.shape
        tail = mx.zeros((B, H, size - self.capacity, D), dtype=self.dtype)
        self.keys = [mx.concatenate([k, tail], axis=2) for k in self.keys]
        self.values = [mx.concatenate([v, tail], axis=2) for v in self.values]

    def trim(self, n: int) -> int:
        """Forget the last n positions (at most all of them); return how many were dropped."""
        n = min(n, self.offset)
        self.offset -= n
        return n

    def truncate(self, length: int) -> None:
        """Keep only the first `length` positions."""
        self.trim(self.offset - min(length, self.offset))

    def state(self) -> list[mx.array]:
        """Every buffer, to evaluate after a pass."""
        return self.keys + self.values
