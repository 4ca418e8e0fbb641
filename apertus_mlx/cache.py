"""The KV cache: keys and values of every layer, kept across calls and across chat turns.

Buffers grow in steps of `step` positions, so decoding writes each new token in place instead
of concatenating a new array per token; `trim` keeps a prefix, which is how a chat reuses the
cache of the turns it has already seen.
"""

from __future__ import annotations

from pathlib import Path

import mlx.core as mx


class KVCache:
    def __init__(self, num_layers: int, step: int = 256):
        self.keys: list[mx.array | None] = [None] * num_layers
        self.values: list[mx.array | None] = [None] * num_layers
        self.offset = 0
        self.step = step

    @property
    def num_layers(self) -> int:
        return len(self.keys)

    @property
    def capacity(self) -> int:
        k = self.keys[0]
        return 0 if k is None else k.shape[2]

    def update_and_fetch(
        self, layer: int, keys: mx.array, values: mx.array
    ) -> tuple[mx.array, mx.array]:
        """Write (B, kv_heads, L, head_dim) at the current offset; return everything so far."""
        start, end = self.offset, self.offset + keys.shape[2]
        buf_k, buf_v = self.keys[layer], self.values[layer]
        if buf_k is None or end > buf_k.shape[2]:
            buf_k, buf_v = self._grown(buf_k, keys, end), self._grown(buf_v, values, end)
        buf_k[..., start:end, :] = keys
        buf_v[..., start:end, :] = values
        self.keys[layer], self.values[layer] = buf_k, buf_v
        return buf_k[..., :end, :], buf_v[..., :end, :]

    def reserve(self, needed: int) -> None:
        """Grow every (non-empty) layer's buffers to hold `needed` positions."""
        for i, (k, v) in enumerate(zip(self.keys, self.values)):
            if k is not None and needed > k.shape[2]:
                self.keys[i], self.values[i] = self._grown(k, k, needed), self._grown(v, v, needed)

    def _grown(self, buf: mx.array | None, new: mx.array, needed: int) -> mx.array:
        size = -(-needed // self.step) * self.step
        B, H, _, D = new.shape
        grown = mx.zeros((B, H, size, D), dtype=new.dtype)
        if buf is not None and self.offset:
            grown[..., : self.offset, :] = buf[..., : self.offset, :]
        return grown

    def advance(self, n: int) -> None:
        self.offset += n

    def trim(self, n: int) -> int:
        """Forget the last n positions (at most all of them); return how many were dropped."""
        n = min(n, self.offset)
        self.offset -= n
        return n

    def truncate(self, length: int) -> None:
        """Keep only the first `length` positions."""
        self.trim(self.offset - min(length, self.offset))

    def state(self) -> list[mx.array]:
        """The filled part of every buffer, for eval or saving."""
        out = []
        for k, v in zip(self.keys, self.values):
            if k is not None:
                out += [k[..., : self.offset, :], v[..., : self.offset, :]]
        return out

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in self.keys + self.values if a is not None)

    def save(self, path: str | Path, metadata: dict[str, str] | None = None) -> None:
        """Save as safetensors, so a saved conversation does not pay its prefill again."""
        arrays = {}
        for i, (k, v) in enumerate(zip(self.keys, self.values)):
            if k is not None:
                arrays[f"{i}.keys"] = k[..., : self.offset, :]
                arrays[f"{i}.values"] = v[..., : self.offset, :]
        meta = {"offset": str(self.offset), **(metadata or {})}
        mx.save_safetensors(str(path), arrays, metadata=meta)

    @classmethod
    def load(cls, path: str | Path, num_layers: int) -> tuple[KVCache, dict[str, str]]:
        arrays, meta = mx.load(str(path), return_metadata=True)
        cache = cls(num_layers)
        offset = int(meta.get("offset", 0))
        for i in range(num_layers):
            if f"{i}.keys" in arrays and offset:
                cache.offset = 0
                cache.update_and_fetch(i, arrays[f"{i}.keys"], arrays[f"{i}.values"])
        cache.offset = offset
        return cache, meta
