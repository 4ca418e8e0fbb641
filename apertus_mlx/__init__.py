"""apertus-mlx: the Apertus language models on Apple's MLX, fully offline.

from apertus_mlx import load
model, tokenizer = load("swiss-ai/Apertus-8B-Instruct-2509")   # or a local directory
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

if TYPE_CHECKING:
    from .model import Model
    from .tokenizer import Tokenizer


def load(
    path_or_repo_id: str | Path, dtype: Any = None, fuse: bool = True
) -> tuple[Model, Tokenizer]:
    """Load model and tokenizer from a checkpoint directory or a cached hub repo id.

    dtype: compute dtype ("bfloat16", "float16", "float32" or an mx.Dtype); by default
    float32 on the CPU backend, the checkpoint's dtype on Metal.
    """
    from .hub import resolve_model
    from .loading import load_model
    from .tokenizer import load_tokenizer

    path = resolve_model(path_or_repo_id)
    return load_model(path, dtype=dtype, fuse=fuse), load_tokenizer(path)


__all__ = ["load", "__version__"]
