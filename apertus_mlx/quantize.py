"""BF16/F16/F32 -> MLX-quantized checkpoints (`apertus-mlx convert`), written as mlx-lm writes them.

The output loads unchanged in mlx-lm: tensors keep the checkpoint's names and dtype, config.json
gains mlx-lm's `quantization` block (per-layer overrides keyed by module path), and the safetensors
shards carry `{"format": "mlx"}`. The directory appears only when complete: everything is written
into a temporary sibling and renamed at the end. A lock file beside the output keeps two
conversions from writing the same directory; siblings left by a killed conversion are removed by
the next one.
"""

from __future__ import annotations

import errno
import json
import math
import os
import re
import shutil
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from .config import ModelArgs, read_config
from .errors import DestinationError, UsageError
from .loading import check_safetensors, load_model, read_weights, safetensors_files
from .model import Model

AFFINE_BITS = (2, 3, 4, 5, 6, 8)
AFFINE_GROUP_SIZES = (32, 64, 128)
# mode -> (group size, bits): the floating-point formats allow exactly one pair each
FP_MODES = {"mxfp4": (32, 4), "nvfp4": (16, 4), "mxfp8": (32, 8)}
MODES = ("affine", *FP_MODES)
MAX_SHARD_BYTES = 5 << 30  # mlx-lm's limit
COPIED_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "generation_config.json",
    "chat_template.jinja",
)
EMBEDDING = "model.embed_tokens"
HEAD = "lm_head"


@dataclass
class QuantizeResult:
    """What a conversion wrote and what it cost."""

    out: Path
    bits: int
    group_size: int
    mode: str
    size_bytes: int  # safetensors files on disk
    total_parameters: int
    bits_per_weight: float  # tensor bytes * 8 / parameters, as mlx-lm reports it
    quantization: dict[str, Any]  # the block written into config.json
    unquantized: list[tuple[str, str]] = field(default_factory=list)  # (module path, why)

    def to_dict(self) -> dict[str, Any]:
        return {
            "out": str(self.out),
            "bits": self.bits,
            "group_size": self.group_size,
            "mode": self.mode,
            "size_bytes": self.size_bytes,
            "total_parameters": self.total_parameters,
            "bits_per_weight": round(self.bits_per_weight, 4),
            "quantization": self.quantization,
            "unquantized": [{"path": p, "reason": r} for p, r in self.unquantized],
        }


def resolve_settings(bits: int, group_size: int | None, mode: str) -> int:
    """Check bits / group size / mode before any work; return the group size to use."""
    if mode not in MODES:
        raise UsageError(f"unknown quantization mode {mode!r}: choose one of {', '.join(MODES)}")
    if mode in FP_MODES:
        g, b = FP_MODES[mode]
        if bits != b or group_size not in (None, g):
            groups = f" in groups of {group_size}" if group_size is not None else ""
            raise UsageError(f"{mode} means {b} bits in groups of {g}; got {bits} bits{groups}")
        return g
    if bits not in AFFINE_BITS:
        raise UsageError(
            f"cannot quantize to {bits} bits: choose one of {', '.join(map(str, AFFINE_BITS))}"
        )
    group_size = 64 if group_size is None else group_size
    if group_size not in AFFINE_GROUP_SIZES:
        raise UsageError(
            f"group size {group_size} is not supported: choose one of "
            f"{', '.join(map(str, AFFINE_GROUP_SIZES))}"
        )
    return group_size


def quantize_checkpoint(
    src: Path,
    out: Path,
    bits: int,
    group_size: int | None = None,
    mode: str = "affine",
    embedding_bits: int | None = None,
    head_bits: int | None = None,
    force: bool = False,
    max_shard_bytes: int = MAX_SHARD_BYTES,
    progress: Callable[[str], None] | None = None,
) -> QuantizeResult:
    """Quantize the checkpoint at `src` into the new directory `out`; `progress` hears one
    line once the source and the destination have passed their checks.

    `group_size` None means the mode's own (64 for affine). `embedding_bits` / `head_bits` give
    the embedding and the output head their own (affine) width: the mixed recipe. In a tied
    checkpoint the embedding is the head, so it gets the higher of the two.
    """
    src, out = Path(src), Path(out)
    group_size = resolve_settings(bits, group_size, mode)
    for label, extra in (("embedding", embedding_bits), ("head", head_bits)):
        if extra is not None:
            if mode != "affine":
                raise UsageError(f"--{label}-bits needs --mode affine")
            resolve_settings(extra, group_size, mode)
    _check_not_nested(src, out)
    _check_destination(src, out, force)
    config = read_config(src)
    ModelArgs.from_dict(config)  # a broken config.json is named as such, before anything else
    if config.get("quantization") or config.get("quantization_config"):
        raise UsageError(f"{src} is already quantized: convert from the BF16/F16/F32 checkpoint")

    with _writing(out):
        _check_destination(src, out, force)  # again: under the lock, it stays true
        tmp = _sibling(out, "partial")  # a read-only folder fails here, before any work
        try:
            _check_space(src, tmp, bits, group_size, mode)
            _, stored = read_weights(src)
            model = load_model(src, dtype=stored, fuse=False)
            if progress is not None:
                progress(f"quantizing {src} -> {out}")
            block, unquantized = _quantize(model, bits, group_size, mode, embedding_bits, head_bits)
            weights = _weights_to_save(model, stored)
            total_params = count_parameters(model)
            save_weights(tmp, weights, total_params, max_shard_bytes)
            del weights
            save_config({**config, "quantization": block}, tmp / "config.json")
            for name in COPIED_FILES:
                if (src / name).is_file():
                    shutil.copy(src / name, tmp / name)
            _replace(tmp, out)
        except BaseException as e:
            shutil.rmtree(tmp, ignore_errors=True)
            if isinstance(e, OSError):
                raise DestinationError(f"cannot write {out}: {_os_reason(e)}") from None
            raise
    size, data_bytes = checkpoint_bytes(out)
    return QuantizeResult(
        out=out,
        bits=bits,
        group_size=group_size,
        mode=mode,
        size_bytes=size,
        total_parameters=total_params,
        bits_per_weight=data_bytes * 8 / total_params,
        quantization=block,
        unquantized=unquantized,
    )


def _check_not_nested(src: Path, out: Path) -> None:
    """Replacing `out` must never touch the source: neither its directory nor, for a Hugging
    Face cache snapshot, the blobs its files link to (symlinks resolved)."""
    target = out.resolve()
    sources = {src.resolve()}
    sources |= {f.resolve().parent for f in src.iterdir() if f.is_symlink()}
    for s in sources:
        if target == s:
            raise UsageError("the output directory is the source checkpoint: choose another --out")
        if target in s.parents:
            raise UsageError(
                f"the output directory {out} contains the source checkpoint ({s}): "
                "choose another --out"
            )
        if s in target.parents:
            raise UsageError(
                f"the output directory {out} is inside the source checkpoint ({s}): "
                "choose another --out"
            )


def _check_destination(src: Path, out: Path, force: bool) -> None:
    if out.exists() and not out.is_dir():
        raise UsageError(f"{out} exists and is not a directory")
    if out.is_dir() and any(out.iterdir()) and not force:
        raise UsageError(f"{out} already exists and is not empty: pass --force to replace it")


def _sibling(out: Path, kind: str) -> Path:
    """A new hidden directory beside `out` (same file system, so renames are atomic), made
    with the user's umask rather than mkdtemp's owner-only mode."""
    path = out.parent / f".{out.name}.{kind}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        path.mkdir()
    except OSError as e:
        raise DestinationError(f"cannot write beside {out}: {_os_reason(e)}") from None
    return path


def _check_space(src: Path, tmp: Path, bits: int, group_size: int, mode: str) -> None:
    """Refuse at once when the disk cannot hold the result, rather than after quantizing.

    A lower bound: every source parameter at `bits` plus, per group, a 16-bit scale and bias
    (affine) or an 8-bit scale (floating-point modes); norms, unquantized layers and wider
    embedding or head only add to it."""
    params = sum(
        math.prod(t["shape"])
        for f in safetensors_files(src)
        for k, t in check_safetensors(f).items()
        if k != "__metadata__"
    )
    needed = params * (bits + (8 if mode in FP_MODES else 32) / group_size) / 8
    free = shutil.disk_usage(tmp).free
    if free < needed:
        raise DestinationError(
            f"not enough space beside {tmp.parent}: the result needs at least "
            f"{needed / 1e9:.2f} GB, {free / 1e9:.2f} GB are free"
        )


def _os_reason(e: OSError) -> str:
    if e.errno == errno.ENOSPC:
        return "the disk is full"
    return f"{e.strerror or e} ({e.filename})" if e.filename else (e.strerror or str(e))


class _writing:
    """Hold `.<out>.lock` beside `out` while converting into it: a second conversion into the
    same directory fails at once instead of silently replacing the first one's result. Under
    the lock, siblings left by conversions that were killed (their PID is gone) are removed.
    """

    def __init__(self, out: Path):
        self.out = out
        self.file = out.parent / f".{out.name}.lock"

    def __enter__(self) -> _writing:
        import fcntl

        try:
            self.out.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.file, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise DestinationError(f"cannot write beside {self.out}: {_os_reason(e)}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            # The file may have been unlinked by its last holder between our open and flock.
            if os.fstat(fd).st_ino != os.stat(self.file).st_ino:
                raise BlockingIOError
        except (BlockingIOError, FileNotFoundError):
            os.close(fd)
            raise DestinationError(
                f"another conversion is writing {self.out}: wait for it to finish"
            ) from None
        self.fd = fd
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self._remove_stale()
        return self

    def __exit__(self, *exc: object) -> None:
        try:
            self.file.unlink(missing_ok=True)
        finally:
            os.close(self.fd)  # releases the lock

    def _remove_stale(self) -> None:
        pattern = re.compile(rf"\.{re.escape(self.out.name)}\.(partial|old)-(\d+)-[0-9a-f]{{8}}")
        for path in self.out.parent.iterdir():
            m = pattern.fullmatch(path.name)
            if m and path.is_dir() and not _alive(int(m.group(2))):
                shutil.rmtree(path, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def _replace(tmp: Path, out: Path) -> None:
    """Put the finished `tmp` at `out`; an old `out` goes only once the new one is in place."""
    if not out.exists():
        tmp.rename(out)
        return
    old = _sibling(out, "old")
    out.rename(old / out.name)
    tmp.rename(out)
    shutil.rmtree(old, ignore_errors=True)


def _quantize(
    model: Model,
    bits: int,
    group_size: int,
    mode: str,
    embedding_bits: int | None,
    head_bits: int | None,
) -> tuple[dict[str, Any], list[tuple[str, str]]]:
    """Quantize `model` in place; return mlx-lm's quantization block and the layers left alone."""
    tied = model.args.tie_word_embeddings
    wanted = {HEAD: head_bits, EMBEDDING: embedding_bits}
    if tied:
        given = [b for b in (embedding_bits, head_bits) if b is not None]
        wanted = {EMBEDDING: max(given) if given else None}
    block: dict[str, Any] = {"group_size": group_size, "bits": bits, "mode": mode}
    unquantized: list[tuple[str, str]] = []

    def predicate(path: str, module: nn.Module) -> bool | dict:
        if not hasattr(module, "to_quantized"):
            return False
        in_dim = module.weight.shape[-1]
        if in_dim % group_size:
            unquantized.append(
                (path, f"input dimension {in_dim} is not divisible by group size {group_size}")
            )
            return False
        if wanted.get(path) is not None and wanted[path] != bits:
            block[path] = {"group_size": group_size, "bits": wanted[path], "mode": mode}
            return block[path]
        return True

    nn.quantize(model, group_size, bits, mode=mode, class_predicate=predicate)
    if not any(hasattr(m, "bits") for _, m in model.named_modules()):
        raise UsageError(
            f"no layer's input dimension is divisible by group size {group_size}: "
            "choose a smaller --group-size"
        )
    return block, sorted(unquantized)


def _weights_to_save(model: Model, dtype: mx.Dtype) -> dict[str, mx.array]:
    """The model's tensors in the checkpoint's names and dtype.

    All four xIELU scalars are among them even when the source left beta and eps out (the
    model keeps its defaults for those), which mlx-lm needs: it loads strictly.
    """
    weights = dict(tree_flatten(model.parameters()))
    return {
        k: v.astype(dtype) if mx.issubdtype(v.dtype, mx.floating) else v for k, v in weights.items()
    }


def count_parameters(model: nn.Module) -> int:
    """Parameters as mlx-lm counts them: a quantized weight counts as the floats it stands for."""
    total = 0
    for _, module in tree_flatten(model.leaf_modules(), is_leaf=nn.Module.is_module):
        if hasattr(module, "bits"):
            bias = module["bias"].size if "bias" in module else 0
            total += bias + module.weight.size * 32 // module.bits
        else:
            total += sum(v.size for _, v in tree_flatten(module.parameters()))
    return total


def save_weights(
    path: Path, weights: dict[str, mx.array], total_parameters: int, max_shard_bytes: int
) -> None:
    """Shards of at most `max_shard_bytes` (a bigger tensor gets one of its own) + the index."""
    shards: list[dict[str, mx.array]] = []
    size = 0
    for name in sorted(weights):
        w = weights[name]
        if not shards or size + w.nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = w
        size += w.nbytes
    n = len(shards)
    pattern = "model-{:05d}-of-{:05d}.safetensors" if n > 1 else "model.safetensors"
    weight_map = {}
    for i, shard in enumerate(shards, 1):
        file = pattern.format(i, n)
        mx.save_safetensors(str(path / file), shard, metadata={"format": "mlx"})
        weight_map.update(dict.fromkeys(shard, file))
    index = {
        "metadata": {
            "total_size": sum(w.nbytes for w in weights.values()),
            "total_parameters": total_parameters,
        },
        "weight_map": dict(sorted(weight_map.items())),
    }
    (path / "model.safetensors.index.json").write_text(json.dumps(index, indent=4))


def save_config(config: dict[str, Any], file: Path) -> None:
    """As mlx-lm's `save_config`: the quantization block twice (`quantization_config` for the
    Hugging Face tree), `_name_or_path` dropped, keys sorted."""
    config = dict(config)
    config.pop("_name_or_path", None)
    if "quantization" in config:
        config["quantization_config"] = config["quantization"]
    file.write_text(json.dumps(dict(sorted(config.items())), indent=4))


def checkpoint_bytes(path: Path) -> tuple[int, int]:
    """(bytes of the safetensors files on disk, bytes of tensor data in them)."""
    files = safetensors_files(path)
    data = 0
    for f in files:
        header = check_safetensors(f)
        data += sum(
            t["data_offsets"][1] - t["data_offsets"][0]
            for k, t in header.items()
            if k != "__metadata__"
        )
    return sum(f.stat().st_size for f in files), data
