"""KV caches saved beside conversations, so reopening one does not read its history again.

A conversation's cache is written after each answer as one safetensors file (the filled part
of every layer's keys and values with the token ids they stand for: `KVCache.state` and
`meta_state`, plus what produced them) under `paths.caches_dir()`. It is used only by the same
model, revision, compute dtype, shape and buffer layout (plain, or quantized to the same bits),
and only as far as its tokens are a prefix of the new prompt: a template whose output changed,
an edited message or another branch simply reuse less. A file that cannot be read is deleted
and reported; the directory is kept within a disk budget by dropping the least recently used.

The files hold token ids, from which a conversation's text can be rebuilt: they go with their
conversation (`delete_conversation`).
"""

from __future__ import annotations

import contextlib
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from .errors import StoreError, UsageError

if TYPE_CHECKING:
    from .cache import KVCache
    from .store import Conversation, Store

DEFAULT_BUDGET_GB = 4.0
BUDGET_ENV = "APERTUS_MLX_CACHE_BUDGET_GB"
_KEY = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
_PARTIAL = ".partial-"


def identity(model, model_id: str, revision: str | None, bits: int | None = None) -> dict[str, str]:
    """What a saved cache must match to be reused by `model` with a cache of `bits` bits."""
    a = model.args
    return {
        "model": model_id,
        "revision": revision or "",
        "dtype": str(model.plan.dtype),
        "shape": f"{a.num_hidden_layers}x{a.num_key_value_heads}x{a.head_dim}",
        "kv_bits": str(bits or ""),
    }


def budget_bytes() -> int:
    """The disk budget from `APERTUS_MLX_CACHE_BUDGET_GB` (default 4); a value that is not a
    finite number >= 0 is a UsageError, said before anything is written."""
    value = os.environ.get(BUDGET_ENV)
    if value is None or not value.strip():
        return int(DEFAULT_BUDGET_GB * (1 << 30))
    try:
        gb = float(value)
    except ValueError:
        gb = math.nan
    if not math.isfinite(gb) or gb < 0 or gb > 1 << 20:
        raise UsageError(
            f"{BUDGET_ENV} must be a number of gigabytes between 0 and {1 << 20}, got {value!r}"
        )
    return int(gb * (1 << 30))


@dataclass
class Loaded:
    """What `SavedCaches.load` found: the cache (None if none usable) and, when a file was
    there but could not be used, one line saying why (it has been removed)."""

    cache: KVCache | None
    note: str | None = None


class SavedCaches:
    def __init__(self, directory: str | Path | None = None, budget: int | None = None):
        if directory is None:
            from .paths import caches_dir

            directory = caches_dir()
        self.directory = Path(directory)
        self.budget = budget_bytes() if budget is None else budget

    def _file(self, key: str) -> Path:
        if not _KEY.match(key):
            raise ValueError(f"not a cache key: {key!r}")
        return self.directory / f"{key}.safetensors"

    def save(self, key: str, cache: KVCache, ident: dict[str, str]) -> None:
        """Write the cache's filled positions and their tokens; StoreError (one line) if the
        directory or the disk refuses."""
        import mlx.core as mx

        file = self._file(key)
        partial = file.with_name(f"{key}{_PARTIAL}{os.getpid()}.safetensors")
        try:
            self.directory.mkdir(mode=0o700, parents=True, exist_ok=True)
            mx.save_safetensors(str(partial), cache.state, metadata={**ident, **cache.meta_state})
            partial.replace(file)  # a reader never sees half a file
        except (OSError, RuntimeError) as e:  # MLX reports a failed open as RuntimeError
            reason = getattr(e, "strerror", None) or " ".join(str(e).split())
            raise StoreError(f"KV cache not saved in {self.directory}: {reason}") from None
        finally:
            with contextlib.suppress(OSError):  # a directory that is not one, say
                partial.unlink(missing_ok=True)
        self.evict(keep=file)

    def load(self, key: str, like: KVCache, ident: dict[str, str]) -> Loaded:
        """The saved cache for `key` if it was made for this very model and layout (`like`,
        an empty cache of the model, gives the shapes). A damaged file, or one made by
        another model or layout, is removed and reported: the next save replaces it anyway."""
        import mlx.core as mx

        from .cache import KVCache

        file = self._file(key)
        if not file.is_file():
            return Loaded(None)
        try:
            arrays, meta = mx.load(str(file), return_metadata=True)
            cache = KVCache.from_state(arrays, meta)
        except (OSError, RuntimeError, ValueError) as e:
            file.unlink(missing_ok=True)
            reason = " ".join(str(e).split()) or type(e).__name__
            return Loaded(None, f"the saved KV cache was damaged ({reason}): removed")
        differs = [k for k, v in ident.items() if meta.get(k) != v]
        if differs or not cache.fits(like):
            file.unlink(missing_ok=True)
            what = ", ".join(differs) or "shape"
            return Loaded(None, f"the saved KV cache was made with another {what}: removed")
        mx.eval(cache.arrays())
        os.utime(file)  # recently used
        return Loaded(cache)

    def remove(self, key: str) -> None:
        self._file(key).unlink(missing_ok=True)
        for partial in self.directory.glob(f"{key}{_PARTIAL}*.safetensors"):
            partial.unlink(missing_ok=True)

    def evict(self, keep: Path | None = None) -> None:
        """Drop the least recently used files until the directory fits the budget."""

        def stamped(f: Path) -> tuple[float, int, Path] | None:
            try:
                st = f.stat()
            except OSError:  # removed meanwhile by another process
                return None
            return st.st_mtime, st.st_size, f

        files = sorted(s for f in self.directory.glob("*.safetensors") if (s := stamped(f)))
        total = sum(size for _, size, _ in files)
        for _, size, f in files:
            if total <= self.budget:
                break
            if f != keep:
                total -= size
                f.unlink(missing_ok=True)


def delete_conversation(
    store: Store, conversation_id: str, caches: SavedCaches | None = None
) -> Conversation:
    """Delete a conversation for good: its rows (messages, search index), then its saved KV
    cache (in `caches`, by default the usual place). In this order, a process still answering
    it, which saves its cache and then checks that the conversation exists (`turn`), never
    leaves a file behind."""
    conversation = store.delete(conversation_id)
    (caches or SavedCaches(budget=0)).remove(conversation.id)
    return conversation
