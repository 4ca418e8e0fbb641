"""Load an Apertus checkpoint (Hugging Face layout, BF16/F16/F32 or MLX-quantized) into `Model`.

Safetensors only: nothing that ships with a checkpoint is ever executed. Tensors are read
lazily (`mx.load`), cast on the way and handed to the model one dictionary, so a load never
holds two copies of the weights.
"""

from __future__ import annotations

import json
import re
import struct
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten, tree_unflatten

from .config import ModelArgs
from .errors import CorruptCheckpointError, WeightsError
from .fusion import can_fuse, fuse_qkv
from .model import Model, Part
from .plan import make_plan

OPTIONAL_SUFFIXES = (".act_fn.beta", ".act_fn.eps")  # buffers some exports leave out
DROPPED_SUFFIXES = ("rotary_emb.inv_freq",)  # derived, never a learned weight
_DTYPES = {"BF16": mx.bfloat16, "F16": mx.float16, "F32": mx.float32}


def safetensors_files(path: Path) -> list[Path]:
    """The checkpoint's weight files: those its index names, else every *.safetensors.

    An index may only name files beside it: `../other/model.safetensors` would read another
    model's (or anyone's) file. Names are checked as written, not resolved, because the
    Hugging Face cache links every file to a blob outside the snapshot directory.
    """
    index = path / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
            names = set(weight_map.values())
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
            raise CorruptCheckpointError(f"cannot read {index}: {e}") from None
        for name in sorted(names, key=str):
            if not isinstance(name, str) or Path(name).name != name or name in ("", ".", ".."):
                raise CorruptCheckpointError(
                    f"{index.name} names the weight file {name!r}, which is not a file in "
                    f"{path}: refusing to read outside the checkpoint"
                )
        files = sorted(path / name for name in names)
        missing = [f.name for f in files if not f.is_file()]
        if missing:
            raise CorruptCheckpointError(
                f"{path} is incomplete: the index names {', '.join(missing)}, which are missing "
                "(download it again)"
            )
        return files
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise CorruptCheckpointError(f"{path} has no *.safetensors weights")
    return files


def check_safetensors(file: Path) -> dict[str, Any]:
    """Read the header and check the file is as long as it says: a truncated download
    otherwise fails deep inside evaluation, or reads garbage."""
    try:
        size = file.stat().st_size
        with open(file, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            if n > size - 8:
                raise ValueError("header longer than the file")
            header = json.loads(f.read(n))
        end = max(
            (t["data_offsets"][1] for k, t in header.items() if k != "__metadata__"), default=0
        )
    except (OSError, ValueError, KeyError, TypeError, struct.error) as e:
        raise CorruptCheckpointError(f"{file} is not a valid safetensors file ({e})") from None
    if 8 + n + end > size:
        raise CorruptCheckpointError(
            f"{file} is truncated ({size} of {8 + n + end} bytes): download it again"
        )
    return header


def read_weights(
    path: Path, wanted: Callable[[str], bool] | None = None
) -> tuple[dict[str, mx.array], mx.Dtype]:
    """The tensors (those `wanted` by name, else all), lazily, and the floating dtype most of
    them are stored in. A file holding none of the wanted ones is not opened past its header."""
    weights: dict[str, mx.array] = {}
    counts: dict[str, int] = {}
    for file in safetensors_files(path):
        header = check_safetensors(file)
        names = [n for n in header if n != "__metadata__" and (wanted is None or wanted(n))]
        for name in names:
            counts[header[name]["dtype"]] = counts.get(header[name]["dtype"], 0) + 1
        if not names:
            continue
        try:
            tensors = mx.load(str(file))  # lazy: a tensor not kept is never read
        except (RuntimeError, ValueError) as e:
            raise CorruptCheckpointError(f"cannot read {file}: {e}") from None
        weights.update((name, tensors[name]) for name in names if name in tensors)
    floats = {k: v for k, v in counts.items() if k in _DTYPES}
    stored = _DTYPES[max(floats, key=floats.get)] if floats else mx.float32
    return weights, stored


def sanitize(weights: dict[str, mx.array], args: ModelArgs) -> dict[str, mx.array]:
    out = {}
    for name, w in weights.items():
        if name.endswith(DROPPED_SUFFIXES):
            continue
        if args.tie_word_embeddings and name.startswith("lm_head."):
            continue  # a stray copy of the embedding
        if ".act_fn." in name and w.size == 1:
            w = w.reshape(())  # stored as (1,) by transformers, () by mlx-lm
        out[name] = w
    return out


_LAYER = re.compile(r"^model\.layers\.(\d+)(?=\.|$)")  # a layer's tensors and module path


def holds(part: Part, tie_word_embeddings: bool) -> Callable[[str], bool]:
    """Whether a checkpoint tensor, by name, belongs to `part` (names we do not know are kept,
    so that the strict checks still see them)."""

    def wanted(name: str) -> bool:
        layer = _LAYER.match(name)
        if layer:
            return part.start <= int(layer.group(1)) < part.stop
        if name.startswith("model.embed_tokens."):
            return part.first or (part.last and tie_word_embeddings)
        if name.startswith(("model.norm.", "lm_head.")):
            return part.last
        return True

    return wanted


def localize(
    weights: dict[str, mx.array], quant: dict[str, Any] | None, part: Part
) -> tuple[dict[str, mx.array], dict[str, Any] | None]:
    """Layer numbers from the checkpoint's to the part's (its first layer is 0), in tensor
    names and in the quantization block's per-layer overrides (those of other parts' layers
    dropped)."""
    if part == Part(0, part.total, part.total):
        return weights, quant

    def outside(name: str) -> bool:
        layer = _LAYER.match(name)
        return bool(layer) and not part.start <= int(layer.group(1)) < part.stop

    def rename(name: str) -> str:
        layer = _LAYER.match(name)
        if not layer:
            return name
        return f"model.layers.{int(layer.group(1)) - part.start}{name[layer.end() :]}"

    weights = {rename(k): v for k, v in weights.items()}
    if quant is not None:
        quant = {rename(k): v for k, v in quant.items() if not outside(k)}
    return weights, quant


def quantize_like_checkpoint(
    model: Model, weights: dict[str, mx.array], quant: dict[str, Any]
) -> None:
    """Swap Linear/Embedding layers for quantized ones where the checkpoint has them,
    following mlx-lm's convention: per-layer overrides keyed by module path, else
    quantized exactly where `<path>.scales` exists."""

    def predicate(path: str, module: nn.Module) -> bool | dict:
        if not hasattr(module, "to_quantized"):
            return False
        if path in quant:
            return quant[path]
        if path == "lm_head" and model.args.tie_word_embeddings:
            return False
        return f"{path}.scales" in weights

    defaults = {"group_size": quant.get("group_size"), "bits": quant.get("bits")}
    try:
        nn.quantize(model, **defaults, mode=quant.get("mode", "affine"), class_predicate=predicate)
    except ValueError as e:
        raise WeightsError(
            f"the quantization block in config.json cannot be applied: {e}"
        ) from None


def check_quantized_layers(model: Model, weights: dict[str, mx.array]) -> None:
    """Name the layer whose packed tensors contradict config.json's quantization block (say
    bits 4 where the shapes imply 8): the generic shape message would not say why."""
    for path, module in model.named_modules():
        if not hasattr(module, "bits") or f"{path}.weight" not in weights:
            continue
        packed, scales = weights[f"{path}.weight"], weights.get(f"{path}.scales")
        if scales is None or (packed.shape, scales.shape) == (
            module.weight.shape,
            module.scales.shape,
        ):
            continue
        in_dim = module.weight.shape[-1] * 32 // module.bits
        bits, group = packed.shape[-1] * 32 / in_dim, in_dim / max(scales.shape[-1], 1)
        found = f"{bits:g} bits in groups of {group:g}"
        raise WeightsError(
            f"config.json's quantization block says {path} has {module.bits} bits in groups of "
            f"{module.group_size} ({module.mode}), but its tensors are packed as {found}: "
            "the checkpoint's config.json does not match its weights"
        )


def check_names_and_shapes(model: Model, weights: dict[str, mx.array]) -> None:
    expected = dict(tree_flatten(model.parameters()))
    missing = sorted(k for k in expected if k not in weights and not k.endswith(OPTIONAL_SUFFIXES))
    unexpected = sorted(k for k in weights if k not in expected)
    wrong = sorted(
        f"{k} {tuple(weights[k].shape)} (expected {tuple(v.shape)})"
        for k, v in expected.items()
        if k in weights and weights[k].shape != v.shape
    )
    # Floats where floats belong, packed integers exactly where quantized layers keep them:
    # an int32 embedding would otherwise load and run, as garbage.
    typed = sorted(
        f"{k} {_dtype_name(weights[k].dtype)} (expected {_dtype_name(v.dtype)})"
        for k, v in expected.items()
        if k in weights and not _same_kind(weights[k].dtype, v.dtype)
    )
    problems = []
    kinds = (("missing", missing), ("unexpected", unexpected), ("mis-shaped", wrong))
    for label, names in (*kinds, ("of the wrong type", typed)):
        if names:
            shown = ", ".join(names[:8]) + (f" and {len(names) - 8} more" if len(names) > 8 else "")
            problems.append(f"{len(names)} {label}: {shown}")
    if problems:
        raise WeightsError("the weights do not match config.json: " + "; ".join(problems))


def _same_kind(stored: mx.Dtype, expected: mx.Dtype) -> bool:
    if mx.issubdtype(expected, mx.floating):
        return mx.issubdtype(stored, mx.floating)
    return stored == expected


def _dtype_name(dtype: mx.Dtype) -> str:
    return str(dtype).removeprefix("mlx.core.")


def cast_weights(
    weights: dict[str, mx.array], dtype: mx.Dtype, head: str = "lm_head."
) -> dict[str, mx.array]:
    """Floating tensors to the compute dtype; packed integer weights stay as they are.

    So do quantization scales and biases, except the output head's (prefix `head`): MLX's
    quantized matmul computes in the activations' type, widening stored scales per call and
    per layer (exactly, as fast, and for a layer's worth of memory at a time), while widening
    them all at load would cost 0.5 bit per weight at 4 bits. The head's are widened once, as
    its per-call copy is the largest transient of a step (vocabulary x hidden / group size).
    """

    def cast(name: str, w: mx.array) -> bool:
        if not mx.issubdtype(w.dtype, mx.floating):
            return False
        return name.startswith(head) or not name.endswith((".scales", ".biases"))

    return {k: v.astype(dtype) if cast(k, v) else v for k, v in weights.items()}


def load_model(
    path: str | Path,
    dtype: mx.Dtype | str | None = None,
    fuse: bool = True,
    part: Part | None = None,
    tensor_group: mx.distributed.Group | None = None,
    **plan: bool,
) -> Model:
    """Build the model for the checkpoint at `path` (a local directory).

    The execution plan (compute dtype, kernels, fusion) is made here, once, from the machine
    and the checkpoint; `fuse=False` keeps q, k and v apart (what `convert` saves), and
    `plan` forces other fields of it (tests run the Metal path's `fast_ops=True` on a CPU).
    `part` loads one block of layers (see `model.Part`), reading only that block's tensors;
    `tensor_group` keeps this rank's slice of every layer (`tensor_parallel.shard`), each
    tensor read whole and cut before the next, so the peak is about the slice.
    """
    path = Path(path)
    args = ModelArgs.from_dir(path)
    part = part or Part.whole(args)
    weights, stored = read_weights(path, holds(part, args.tie_word_embeddings))
    weights, quant = localize(sanitize(weights, args), args.quantization, part)
    fuse = fuse and tensor_group is None and can_fuse(weights, quant)
    if fuse:
        weights, quant = fuse_qkv(weights, quant)
    plan = replace(make_plan(stored, dtype, fuse, quantized=bool(quant)), **plan)
    model = Model(args, plan, part)
    if quant:
        quantize_like_checkpoint(model, weights, quant)
        check_quantized_layers(model, weights)
    check_names_and_shapes(model, weights)
    head = "model.embed_tokens." if args.tie_word_embeddings else "lm_head."
    model.update(tree_unflatten(list(cast_weights(weights, plan.dtype, head).items())))
    del weights
    if tensor_group is not None:
        from .tensor_parallel import shard

        shard(model, tensor_group)  # before anything is read: the cuts are what is read
    mx.eval(model.parameters())
    model.eval()
    return model
