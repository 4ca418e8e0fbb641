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
    path_or_repo_id: str | Path,
    dtype: Any = None,
    fuse: bool = True,
    tensor_group: Any = None,
) -> tuple[Model, Tokenizer]:
    """Load model and tokenizer from a checkpoint directory or a cached hub repo id.

    dtype: compute dtype ("bfloat16", "float16", "float32" or an mx.Dtype); by default the
    checkpoint's dtype on Metal; on the CPU a dense bfloat16 checkpoint's own dtype and
    float32 for the rest (see `plan.compute_dtype`). The model carries the checkpoint's end
    tokens and sampling defaults as `model.generation`.

    tensor_group: an `mx.distributed.Group` whose every rank runs the same program (started
    by `mlx.launch`): each keeps its slice of every layer (see `tensor_parallel`).
    """
    from .config import GenerationConfig, ModelArgs
    from .distributed import active
    from .errors import TokenizerError, UsageError
    from .hub import resolve_model
    from .loading import load_model
    from .plan import check_dtype
    from .tokenizer import load_tokenizer

    check_dtype(dtype)
    path = resolve_model(path_or_repo_id)
    ModelArgs.from_dir(path)  # config.json, then tokenizer: cheap checks before the weights
    tokenizer = load_tokenizer(path)
    generation = GenerationConfig.from_dir(path, tokenizer.end_token_ids())
    pipeline = active()  # rank 0 of several: each rank loads its part
    if pipeline is not None and tensor_group is not None:
        raise UsageError("a model split into layers across hosts cannot also be split by heads")
    if pipeline is not None:
        model = pipeline.load(path_or_repo_id, path, dtype=dtype, fuse=fuse)
    else:
        model = load_model(path, dtype=dtype, fuse=fuse, tensor_group=tensor_group)
    vocab = model.args.vocab_size
    if tokenizer.max_token_id >= vocab:
        # The embedding may be larger than the tokenizer (padding); never smaller: an id past
        # its end reads outside the matrix.
        raise TokenizerError(
            f"the tokenizer's ids go up to {tokenizer.max_token_id} but the model has "
            f"{vocab} embeddings (config.json vocab_size): tokenizer.json belongs to another model"
        )
    model.generation = generation
    return model, tokenizer


__all__ = ["load", "__version__"]
