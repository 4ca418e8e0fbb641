"""The KV cache: keys and values of every layer, kept across calls and across chat turns.

Buffers are preallocated, (batch, kv_heads, capacity, head_dim) per layer, and grow in steps of
`step` positions. A forward pass writes its new keys and values in place with
`mx.slice_update` at the cache's position, given to it as an array (`KVBuffers`), and
attention masks the unused tail: so one compiled graph serves every position until the
buffers grow, whether it reads a prompt chunk, one token or a block of drafted tokens
(outside a compiled graph attention reads only the filled positions).
`trim` keeps a prefix, which is how a chat reuses the turns it has already seen and how
speculative decoding drops rejected drafts.

With `bits` (8 or 4) the buffers hold keys and values quantized in groups along head_dim,
as (packed, scales, biases), and attention multiplies with them quantized: a long context
then needs about 0.28x (8 bits) or 0.16x (4 bits) of the memory of float32 buffers
(0.56x and 0.31x of bfloat16 ones), at a small cost in fidelity (`benchmarks --kv`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import mlx.core as mx

DEFAULT_STEP = 256
KV_BITS = (4, 8)

Buffer = mx.array | tuple[mx.array, mx.array, mx.array]  # plain, or (packed, scales, biases)


def _update(buffer: Buffer, new: Buffer, position: mx.array) -> Buffer:
    if isinstance(buffer, tuple):
        return tuple(mx.slice_update(b, n, position, axes=(2,)) for b, n in zip(buffer, new))
    return mx.slice_update(buffer, new, position, axes=(2,))


def _filled(buffer: Buffer, end: int) -> Buffer:
    if isinstance(buffer, tuple):
        return tuple(b[..., :end, :] for b in buffer)
    return buffer[..., :end, :]


def attention(q: mx.array, keys: Buffer, values: Buffer, scale: float, mask) -> mx.array:
    """Scaled dot-product attention of q (B, heads, L, D) over plain or quantized buffers
    (grouped-query: heads a multiple of the buffers' kv heads)."""
    if not isinstance(keys, tuple):
        return mx.fast.scaled_dot_product_attention(q, keys, values, scale=scale, mask=mask)
    B, heads, L, D = q.shape
    kv_heads = keys[0].shape[1]
    group = D // keys[1].shape[-1]
    bits = keys[0].shape[-1] * 32 // D
    q = (q * scale).reshape(B, kv_heads, heads // kv_heads, L, D)
    keys, values = (tuple(x[:, :, None] for x in buf) for buf in (keys, values))
    scores = mx.quantized_matmul(q, *keys, transpose=True, group_size=group, bits=bits)
    if isinstance(mask, str):  # "causal", over the filled positions only
        length = scores.shape[-1]
        mask = mx.arange(length - L, length)[:, None] >= mx.arange(length)[None, :]
    if mask is not None:
        scores = mx.where(mask, scores, mx.finfo(scores.dtype).min)
    scores = mx.softmax(scores, axis=-1, precise=True)
    out = mx.quantized_matmul(scores, *values, transpose=False, group_size=group, bits=bits)
    return out.reshape(B, heads, L, D)


@dataclass
class KVBuffers:
    """What one forward pass reads and writes: every layer's buffers and where to write."""

    keys: list[Buffer]
    values: list[Buffer]
    position: mx.array  # (1,) int32: the first position this pass writes
    # Where the pass ends, when known outside a compiled graph: attention then reads only the
    # filled positions, with the fast causal mask, instead of the whole buffer masked.
    end: int | None = None

    def write(self, layer: int, keys: mx.array, values: mx.array) -> tuple[Buffer, Buffer]:
        """Store (B, kv_heads, L, head_dim) at `position`; return the layer's buffers."""
        if isinstance(self.keys[layer], tuple):
            group = keys.shape[-1] // self.keys[layer][1].shape[-1]
            bits = self.keys[layer][0].shape[-1] * 32 // keys.shape[-1]
            keys, values = (mx.quantize(x, group_size=group, bits=bits) for x in (keys, values))
        self.keys[layer] = _update(self.keys[layer], keys, self.position)
        self.values[layer] = _update(self.values[layer], values, self.position)
        if self.end is None:
            return self.keys[layer], self.values[layer]
        return _filled(self.keys[layer], self.end), _filled(self.values[layer], self.end)

    def mask(self, length: int) -> mx.array | str | None:
        """Which positions each of `length` queries sees: up to position + i, nothing after."""
        if self.end is not None:
            return "causal" if length > 1 else None
        first = self.keys[0]
        capacity = (first[0] if isinstance(first, tuple) else first).shape[2]
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
        bits: int | None = None,
    ):
        if bits is not None:
            from .errors import UsageError

            if bits not in KV_BITS:
                raise UsageError(f"the KV cache quantizes to 4 or 8 bits, not {bits}")
            if head_dim % 32:
                raise UsageError(f"a head_dim of {head_dim} cannot be quantized (groups of 32)")
        self.shape = (batch, kv_heads, 0, head_dim)
        self.dtype = dtype
        self.step = step
        self.bits = bits
        self.group_size = 64 if head_dim % 64 == 0 else 32
        self.keys = [self._empty(0) for _ in range(num_layers)]
        self.values = [self._empty(0) for _ in range(num_layers)]
        self.offset = 0  # positions filled

    def _empty(self, length: int) -> Buffer:
        B, H, _, D = self.shape
        if self.bits is None:
            return mx.zeros((B, H, length, D), dtype=self.dtype)
        groups = D // self.group_size
        return (
            mx.zeros((B, H, length, D * self.bits // 32), dtype=mx.uint32),
            mx.zeros((B, H, length, groups), dtype=self.dtype),
            mx.zeros((B, H, length, groups), dtype=self.dtype),
        )

    @property
    def num_layers(self) -> int:
        return len(self.keys)

    @property
    def capacity(self) -> int:
        first = self.keys[0]
        return (first[0] if isinstance(first, tuple) else first).shape[2]

    def run(self, forward: Callable[[mx.array, KVBuffers], mx.array], inputs: mx.array):
        """Run `forward(inputs, buffers)` after the filled positions; keep what it wrote."""
        length = inputs.shape[1]
        self.reserve(self.offset + length)
        position = mx.array([self.offset], dtype=mx.int32)
        kv = KVBuffers(list(self.keys), list(self.values), position, self.offset + length)
        out = forward(inputs, kv)
        self.keys, self.values = kv.keys, kv.values
        self.offset += length
        return out

    def reserve(self, needed: int) -> None:
        """Grow every layer's buffers to hold `needed` positions (a multiple of `step`)."""
        if needed <= self.capacity:
            return
        size = -(-needed // self.step) * self.step
        tail = self._empty(size - self.capacity)

        def grown(buffer: Buffer) -> Buffer:
            if isinstance(buffer, tuple):
                return tuple(mx.concatenate([b, t], axis=2) for b, t in zip(buffer, tail))
            return mx.concatenate([buffer, tail], axis=2)

        self.keys = [grown(k) for k in self.keys]
        self.values = [grown(v) for v in self.values]

    def trim(self, n: int) -> int:
        """Forget the last n positions (at most all of them); return how many were dropped."""
        n = min(n, self.offset)
        self.offset -= n
        return n

    def truncate(self, length: int) -> None:
        """Keep only the first `length` positions."""
        self.trim(self.offset - min(length, self.offset))

    def keep_prefix(self, cached: Sequence[int], prompt: Sequence[int]) -> int:
        """Keep the positions of `cached` (the tokens this cache holds) that `prompt` starts
        with, never all of the prompt (its last token must be read to give the next token's
        logits); return how many stay."""
        common = 0
        for a, b in zip(cached, prompt):
            if a != b:
                break
            common += 1
        self.truncate(min(common, len(prompt) - 1))
        return self.offset

    def state(self) -> list[mx.array]:
        """Every buffer's arrays, to evaluate after a pass."""
        out: list[mx.array] = []
        for buffer in self.keys + self.values:
            out += list(buffer) if isinstance(buffer, tuple) else [buffer]
        return out
