"""The KV cache: keys and values of every layer, and the token ids they stand for.

Buffers are preallocated, (batch, kv_heads, capacity, head_dim) per layer, and grow in steps of
`step` positions. A forward pass writes its new keys and values in place with
`mx.slice_update` at the cache's position, given to it as an array (`KVBuffers`), and
attention masks the unused tail: so one compiled graph serves every position until the
buffers grow, whether it reads a prompt chunk, one token or a block of drafted tokens
(outside a compiled graph attention reads only the filled positions).

How keys and values are stored is a small class of its own: `PlainBuffers` keeps them as they
are, `QuantizedBuffers` (8 or 4 bits) keeps them in groups along head_dim as (packed, scales,
biases) and attends with quantized matmuls: a long context then needs about 0.28x (8 bits) or
0.16x (4 bits) of the memory of float32 buffers, at a small cost in fidelity
(`benchmarks --kv`). Every layer's keys (and values) are a tuple of arrays either way, so
growing, slicing, saving and loading are the same code for both.

The cache knows which tokens it holds (`tokens`): reusing it for the next prompt keeps the
common prefix (`keep_prefix`), which is how a chat reuses the turns it has already seen and
how speculative decoding drops rejected drafts; saving it (`state`, `meta_state`,
`from_state`) keeps the ids with the keys and values.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import mlx.core as mx

DEFAULT_STEP = 256
FINE_STEP = 64  # see `KVCache.reserve`: fewer shapes than exact sizes, so fewer compiles
KV_BITS = (4, 8)

Buffer = tuple[mx.array, ...]  # one layer's keys (or values): (array,) or (packed, scales, biases)


@dataclass(frozen=True)
class PlainBuffers:
    """Keys and values kept as computed (in the cache's dtype: see `Plan.kv_dtype`)."""

    name = "plain"
    bits = None

    def empty(self, shape: tuple[int, int, int, int], dtype: mx.Dtype) -> Buffer:
        return (mx.zeros(shape, dtype=dtype),)

    def encode(self, x: mx.array) -> Buffer:
        return (x,)

    def attention(self, q: mx.array, keys: Buffer, values: Buffer, scale: float, mask) -> mx.array:
        plain_mask = mask is None or isinstance(mask, str) or mask.ndim in (2, 4)
        if q.dtype != mx.float32 and plain_mask and mx.default_device() == mx.cpu:
            return cpu_attention(q, keys[0], values[0], scale, mask)
        return mx.fast.scaled_dot_product_attention(q, keys[0], values[0], scale=scale, mask=mask)

    def meta(self) -> dict[str, str]:
        return {"buffers": self.name}


def cpu_attention(q: mx.array, keys: mx.array, values: mx.array, scale: float, mask) -> mx.array:
    """What `mx.fast.scaled_dot_product_attention` computes on the CPU (its fallback, bit for
    bit), faster for 16-bit inputs: the query heads sharing a kv head are one matrix product,
    and the softmax runs on float32 scores (its "precise" 16-bit path does the same float32
    arithmetic, slowly). On this backend attention is most of reading a prompt and of a
    batched decoding step's cost per row."""
    B, heads, L, D = q.shape
    kv_heads = keys.shape[1]
    group = heads // kv_heads
    q = (q * mx.array(scale, q.dtype)).reshape(B, kv_heads, group * L, D)
    scores = (q @ keys.swapaxes(-1, -2)).reshape(B, kv_heads, group, L, -1)
    if isinstance(mask, str):  # "causal", the last L of the positions
        length = scores.shape[-1]
        mask = mx.arange(length - L, length)[:, None] >= mx.arange(length)[None, :]
    if mask is not None:
        if mask.ndim == 4:  # (B, heads or 1, L, positions) -> (B, kv heads or 1, group or 1, ...)
            b, h, *rest = mask.shape
            mask = mask[:, :, None] if h == 1 else mask.reshape(b, kv_heads, group, *rest)
        if mask.dtype == mx.bool_:
            scores = mx.where(mask, scores, mx.finfo(scores.dtype).min)
        else:
            scores = scores + mask
    weights = mx.softmax(scores.astype(mx.float32), axis=-1).astype(scores.dtype)
    out = weights.reshape(B, kv_heads, group * L, -1) @ values
    return out.reshape(B, heads, L, D)


@dataclass(frozen=True)
class QuantizedBuffers:
    """Keys and values quantized in groups of `group_size` along head_dim to `bits` bits."""

    bits: int
    group_size: int

    name = "quantized"

    def empty(self, shape: tuple[int, int, int, int], dtype: mx.Dtype) -> Buffer:
        B, H, L, D = shape
        groups = D // self.group_size
        return (
            mx.zeros((B, H, L, D * self.bits // 32), dtype=mx.uint32),
            mx.zeros((B, H, L, groups), dtype=dtype),
            mx.zeros((B, H, L, groups), dtype=dtype),
        )

    def encode(self, x: mx.array) -> Buffer:
        return tuple(mx.quantize(x, group_size=self.group_size, bits=self.bits))

    def attention(self, q: mx.array, keys: Buffer, values: Buffer, scale: float, mask) -> mx.array:
        """Grouped-query attention with quantized matmuls: each kv head serves a contiguous
        group of query heads (head h reads kv head h // group), as repeat_kv does."""
        B, heads, L, D = q.shape
        kv_heads = keys[0].shape[1]
        q = (q * scale).reshape(B, kv_heads, heads // kv_heads, L, D)
        keys, values = (tuple(x[:, :, None] for x in buf) for buf in (keys, values))
        quantized = dict(group_size=self.group_size, bits=self.bits)
        scores = mx.quantized_matmul(q, *keys, transpose=True, **quantized)
        if isinstance(mask, str):  # "causal", over the filled positions only
            length = scores.shape[-1]
            mask = mx.arange(length - L, length)[:, None] >= mx.arange(length)[None, :]
        if mask is not None:
            scores = mx.where(mask, scores, mx.finfo(scores.dtype).min)
        scores = mx.softmax(scores, axis=-1, precise=True)
        out = mx.quantized_matmul(scores, *values, transpose=False, **quantized)
        return out.reshape(B, heads, L, D)

    def meta(self) -> dict[str, str]:
        return {"buffers": self.name, "bits": str(self.bits), "group_size": str(self.group_size)}


Layout = PlainBuffers | QuantizedBuffers


def make_layout(head_dim: int, bits: int | None) -> Layout:
    """Plain buffers, or quantized ones to `bits` (refused where head_dim cannot be grouped)."""
    if bits is None:
        return PlainBuffers()
    from .errors import UsageError

    if bits not in KV_BITS:
        raise UsageError(f"the KV cache quantizes to 4 or 8 bits, not {bits}")
    if head_dim % 32:
        raise UsageError(f"a head_dim of {head_dim} cannot be quantized (groups of 32)")
    return QuantizedBuffers(bits, 64 if head_dim % 64 == 0 else 32)


@dataclass
class KVBuffers:
    """What one forward pass reads and writes: every layer's buffers and where to write."""

    layout: Layout
    keys: list[Buffer]
    values: list[Buffer]
    position: mx.array  # (1,) int32: the first position this pass writes
    # Where the pass ends, when known outside a compiled graph: attention then reads only the
    # filled positions, with the fast causal mask, instead of the whole buffer masked.
    end: int | None = None

    def attend(
        self, layer: int, q: mx.array, keys: mx.array, values: mx.array, scale: float, mask
    ) -> mx.array:
        """Store this pass's keys and values (B, kv_heads, L, head_dim) at `position`, then
        attend with q over every position so far."""
        stored = []
        for buffers, new in ((self.keys, keys), (self.values, values)):
            parts = self.layout.encode(new)
            buffers[layer] = tuple(
                mx.slice_update(
                    b, n if n.dtype == b.dtype else n.astype(b.dtype), self.position, axes=(2,)
                )
                for b, n in zip(buffers[layer], parts)
            )
            whole = buffers[layer]
            stored.append(
                whole if self.end is None else tuple(b[..., : self.end, :] for b in whole)
            )
        return self.layout.attention(q, *stored, scale, mask)

    def rotation(self, rope: Any, length: int) -> Any:
        """The pass's RoPE rotation (`model.RoPE`), from its position."""
        return rope.rotation(length, self.position[0])

    def mask(self, length: int) -> mx.array | str | None:
        """Which positions each of `length` queries sees: up to position + i, nothing after."""
        if self.end is not None:
            return "causal" if length > 1 else None
        capacity = self.keys[0][0].shape[2]
        last = self.position + mx.arange(length, dtype=mx.int32)
        return mx.arange(capacity, dtype=mx.int32)[None, :] <= last[:, None]


class KVCache:
    """Every layer's keys and values, and the ids of the tokens they stand for."""

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
        self.layout: Layout = make_layout(head_dim, bits)
        self.shape = (batch, kv_heads, 0, head_dim)
        self.dtype = dtype
        self.step = step
        self.keys: list[Buffer] = [self._empty(0) for _ in range(num_layers)]
        self.values: list[Buffer] = [self._empty(0) for _ in range(num_layers)]
        self.offset = 0  # positions filled
        self._ids: list[int] = []  # the tokens of the filled positions, as far as materialized
        self._pending: list[mx.array] = []  # inputs not yet turned into ids (no sync mid-decode)

    def _empty(self, length: int) -> Buffer:
        B, H, _, D = self.shape
        return self.layout.empty((B, H, length, D), self.dtype)

    @property
    def bits(self) -> int | None:
        return self.layout.bits

    @property
    def num_layers(self) -> int:
        return len(self.keys)

    @property
    def capacity(self) -> int:
        return self.keys[0][0].shape[2]

    @property
    def tokens(self) -> list[int]:
        """The token ids of the filled positions (batch 1), oldest first."""
        if self._pending:
            for inputs in self._pending:
                self._ids += inputs.reshape(-1).tolist()
            self._pending = []
        return self._ids

    def run(self, forward: Callable[[mx.array, KVBuffers], mx.array], inputs: mx.array):
        """Run `forward(inputs, buffers)` after the filled positions; keep what it wrote."""
        kv = self.begin(inputs.shape[1])
        out = forward(inputs, kv)
        self.commit(kv, inputs)
        return out

    def begin(self, length: int) -> KVBuffers:
        """The buffers a pass of `length` inputs after the filled positions writes."""
        self.reserve(self.offset + length)
        position = mx.array([self.offset], dtype=mx.int32)
        return KVBuffers(
            self.layout, list(self.keys), list(self.values), position, self.offset + length
        )

    def commit(self, kv: KVBuffers, inputs: mx.array) -> None:
        """Keep what the pass on `kv` (from `begin`) wrote for `inputs`."""
        self.keys, self.values = kv.keys, kv.values
        self.offset += inputs.shape[1]
        if inputs.shape[0] == 1 and inputs.ndim == 2:  # ids (a pipeline's later parts take
            self._pending.append(inputs)  # hidden states, which stand for no token here)

    def reserve(self, needed: int, most: int | None = None) -> None:
        """Grow every layer's buffers to hold `needed` positions (a multiple of `step`).

        `most`, the most positions the cache will hold for now (a prompt plus its answer
        budget), caps the growth at that, rounded to `FINE_STEP`: a short exchange does not
        allocate a whole step it will never fill, and a long prompt reserved up front is not
        grown (copied) chunk by chunk.
        """
        if needed <= self.capacity:
            return
        size = _round_up(needed, self.step)
        if most is not None:
            size = min(size, _round_up(max(needed, most), FINE_STEP))
        tail = self._empty(size - self.capacity)

        def grown(buffer: Buffer) -> Buffer:
            return tuple(mx.concatenate([b, t], axis=2) for b, t in zip(buffer, tail))

        self.keys = [grown(k) for k in self.keys]
        self.values = [grown(v) for v in self.values]

    def trim(self, n: int) -> int:
        """Forget the last n positions (at most all of them); return how many were dropped."""
        n = min(n, self.offset)
        self.offset -= n
        del self.tokens[self.offset :]
        return n

    def truncate(self, length: int) -> None:
        """Keep only the first `length` positions."""
        self.trim(self.offset - min(length, self.offset))

    def keep_prefix(self, prompt: Sequence[int]) -> int:
        """Keep the positions whose tokens `prompt` starts with, never all of the prompt (its
        last token must be read to give the next token's logits); return how many stay."""
        common = 0
        for a, b in zip(self.tokens, prompt):
            if a != b:
                break
            common += 1
        self.truncate(min(common, len(prompt) - 1))
        return self.offset

    def copy_prefix(self, prompt: Sequence[int]) -> KVCache:
        """A new cache holding the positions `keep_prefix(prompt)` would keep; this one stays
        as it is. Nothing is copied now: MLX arrays are values, and the copy's first write
        makes its own buffers."""
        copy = KVCache.__new__(KVCache)
        copy.layout, copy.shape = self.layout, self.shape
        copy.dtype, copy.step = self.dtype, self.step
        copy.keys, copy.values = list(self.keys), list(self.values)
        copy.offset, copy._ids, copy._pending = self.offset, list(self.tokens), []
        copy.keep_prefix(prompt)
        return copy

    def arrays(self) -> list[mx.array]:
        """Every buffer's arrays, to evaluate after a pass."""
        return [a for buffer in self.keys + self.values for a in buffer]

    def nbytes(self) -> int:
        return sum(a.nbytes for a in self.arrays())

    # -- saving and loading: the filled positions, and what they stand for ---------------------

    @property
    def state(self) -> dict[str, mx.array]:
        """The filled part of every buffer, by name ("3.keys.0": layer 3's keys, first array)."""
        n = self.offset
        return {
            f"{i}.{kind}.{j}": a[..., :n, :]
            for kind, buffers in (("keys", self.keys), ("values", self.values))
            for i, buffer in enumerate(buffers)
            for j, a in enumerate(buffer)
        }

    @property
    def meta_state(self) -> dict[str, str]:
        """What `from_state` needs beside the arrays: the layout and the token ids."""
        return {**self.layout.meta(), "tokens": json.dumps(self.tokens[: self.offset])}

    @classmethod
    def from_state(cls, state: dict[str, mx.array], meta: dict[str, str]) -> KVCache:
        """A cache holding what `state` and `meta_state` describe; ValueError if they do not
        describe one (missing arrays, ragged lengths, tokens that do not match)."""
        try:
            tokens = [int(t) for t in json.loads(meta["tokens"])]
            bits = int(meta["bits"]) if meta.get("buffers") == "quantized" else None
            layers = 1 + max(int(name.split(".")[0]) for name in state)
            first = state["0.keys.0"]
        except (KeyError, ValueError, TypeError) as e:
            raise ValueError(f"not a saved KV cache ({e})") from None
        B, H, L, D = first.shape
        dtype = first.dtype if bits is None else state["0.keys.1"].dtype
        head_dim = D if bits is None else D * 32 // bits
        cache = cls(layers, H, head_dim, dtype, batch=B, bits=bits)
        if not tokens or len(tokens) != L or len(state) != 2 * layers * len(cache.keys[0]):
            raise ValueError("the saved KV cache is incomplete")
        cache.reserve(L)
        start = mx.array([0], dtype=mx.int32)
        for kind, buffers in (("keys", cache.keys), ("values", cache.values)):
            for i in range(layers):
                saved = [state.get(f"{i}.{kind}.{j}") for j in range(len(buffers[i]))]
                if any(
                    a is None or a.shape[:3] != (B, H, L) or a.dtype != e.dtype
                    for a, e in zip(saved, buffers[i])
                ):
                    raise ValueError(f"the saved KV cache's layer {i} {kind} do not fit")
                buffers[i] = tuple(
                    mx.slice_update(e, a, start, axes=(2,)) for e, a in zip(buffers[i], saved)
                )
        cache.offset, cache._ids = L, tokens
        return cache

    def fits(self, other: KVCache) -> bool:
        """Same layers, heads, head size, dtype and layout: one can stand in for the other."""
        return (
            self.num_layers == other.num_layers
            and self.shape[:2] == other.shape[:2]
            and self.shape[3] == other.shape[3]
            and self.dtype == other.dtype
            and self.layout == other.layout
        )


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple
