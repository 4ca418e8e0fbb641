"""KV caches saved beside conversations, so reopening one does not read its history again.

A conversation's cache is written after each answer as one safetensors file (the filled part
of every layer's keys and values, the token ids they stand for, and what produced them) under
`paths.data_dir()/caches`. It is used only by the same model, revision and compute dtype, and
only as far as its tokens are a prefix of the new prompt: a template whose output changed, an
edited message or another branch simply reuse less. The directory is kept within a disk budget
by dropping the least recently used files.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import mlx.core as mx

from .cache import KVCache

DEFAULT_BUDGET_BYTES = 4 << 30
BUDGET_ENV = "APERTUS_MLX_CACHE_BUDGET_GB"
_KEY = re.compile(r"^[A-Za-z0-9_-]{1,64}$")


def identity(model, model_id: str, revision: str | None) -> dict[str, str]:
    """What a saved cache must match to be reused by `model`."""
    a = model.args
    return {
        "model": model_id,
        "revision": revision or "",
        "dtype": str(model.plan.dtype),
        "shape": f"{a.num_hidden_layers}x{a.num_key_value_heads}x{a.head_dim}",
    }


def budget_bytes() -> int:
    value = os.environ.get(BUDGET_ENV)
    try:
        return int(float(value) * (1 << 30)) if value else DEFAULT_BUDGET_BYTES
    except ValueError:
        return DEFAULT_BUDGET_BYTES


class SavedCaches:
    def __init__(self, directory: str | Path | None = None, budget: int | None = None):
        if directory is None:
            from .paths import data_dir

            directory = data_dir() / "caches"
        self.directory = Path(directory)
        self.budget = budget_bytes() if budget is None else budget

    def _file(self, key: str) -> Path:
        if not _KEY.match(key):
            raise ValueError(f"not a cache key: {key!r}")
        return self.directory / f"{key}.safetensors"

    def save(self, key: str, cache: KVCache, tokens: list[int], ident: dict[str, str]) -> None:
        """Write the cache's first `len(tokens)` positions; raises OSError if it cannot."""
        n = min(len(tokens), cache.offset)
        arrays = {}
        for i, buffers in enumerate(zip(cache.keys, cache.values)):
            for name, buffer in zip(("keys", "values"), buffers):
                parts = buffer if isinstance(buffer, tuple) else (buffer,)
                for j, part in enumerate(parts):  # a quantized buffer has three
                    arrays[f"{i}.{name}.{j}"] = part[..., :n, :]
        meta = {**ident, "tokens": json.dumps(tokens[:n]), "kv_bits": str(cache.bits or "")}
        self.directory.mkdir(parents=True, exist_ok=True)
        file = self._file(key)
        partial = file.with_suffix(f".partial-{os.getpid()}.safetensors")
        try:
            mx.save_safetensors(str(partial), arrays, metadata=meta)
            partial.replace(file)  # a reader never sees half a file
        finally:
            partial.unlink(missing_ok=True)
        self.evict(keep=file)

    def load(self, key: str, model, ident: dict[str, str]) -> tuple[KVCache, list[int]] | None:
        """The saved cache and its tokens, if there is one for this very model."""
        file = self._file(key)
        try:
            arrays, meta = mx.load(str(file), return_metadata=True)
            tokens = [int(t) for t in json.loads(meta["tokens"])]
        except (OSError, RuntimeError, ValueError, KeyError):
            return None
        if any(meta.get(k) != v for k, v in ident.items()):
            return None
        bits = int(meta["kv_bits"]) if meta.get("kv_bits") else None
        cache = model.make_cache(bits=bits)
        parts = 3 if bits else 1
        if not tokens or len(arrays) != 2 * parts * cache.num_layers:
            return None
        cache.reserve(len(tokens))
        start = mx.array([0], dtype=mx.int32)
        for i in range(cache.num_layers):
            for buffers in (cache.keys, cache.values):
                name = "keys" if buffers is cache.keys else "values"
                saved = tuple(arrays.get(f"{i}.{name}.{j}") for j in range(parts))
                empty = buffers[i] if bits else (buffers[i],)
                if any(
                    a is None or a.shape[2] != len(tokens) or a.dtype != e.dtype
                    for a, e in zip(saved, empty)
                ):
                    return None
                filled = tuple(
                    mx.slice_update(e, a, start, axes=(2,)) for e, a in zip(empty, saved)
                )
                buffers[i] = filled if bits else filled[0]
        cache.offset = len(tokens)
        mx.eval(cache.state())
        os.utime(file)  # recently used
        return cache, tokens

    def remove(self, key: str) -> None:
        self._file(key).unlink(missing_ok=True)

    def evict(self, keep: Path | None = None) -> None:
        """Drop the least recently used files until the directory fits the budget."""
        files = sorted(self.directory.glob("*.safetensors"), key=lambda f: f.stat().st_mtime)
        total = sum(f.stat().st_size for f in files)
        for f in files:
            if total <= self.budget:
                break
            if f != keep:
                total -= f.stat().st_size
                f.unlink(missing_ok=True)
