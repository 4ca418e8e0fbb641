"""Which rank holds which layers: a checkpoint's footprint, read from headers, and the split.

Every rank computes the same split from the same inputs (the checkpoint's footprint, which
the identity digest proves equal, and every rank's memory, exchanged at start), so nobody
has to be told. The default gives each rank a share of the weights proportional to its
memory; the first rank also holds the embedding and the last one the final norm and the head
(the embedding again when the head is tied to it), so they count too.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import mlx.core as mx

from .errors import UsageError
from .model import Part

_LAYER = re.compile(r"^model\.layers\.(\d+)\.")
_FLOATS = {"BF16": "bfloat16", "F16": "float16", "F32": "float32"}


@dataclass(frozen=True)
class Footprint:
    """What a checkpoint is (`digest`) and how many bytes each of its pieces has."""

    digest: str  # of config.json and every tensor's name, dtype and shape
    stored: str  # the floating dtype most tensors are stored in
    layers: tuple[int, ...]  # bytes per layer
    embedding: int  # bytes of the embedding (the first rank's extra)
    head: int  # bytes of the final norm and the head (the last rank's extra)


def footprint(path: Path) -> Footprint:
    """Read from config.json and the safetensors headers only: no tensor data."""
    from .config import read_config
    from .loading import check_safetensors, safetensors_files

    config = read_config(path)
    layers = [0] * int(config["num_hidden_layers"])
    tied = bool(config.get("tie_word_embeddings", False))
    embedding = head = 0
    dtypes: Counter[str] = Counter()
    digest = hashlib.sha256(json.dumps(config, sort_keys=True).encode())
    for file in safetensors_files(path):
        header = check_safetensors(file)
        for name in sorted(k for k in header if k != "__metadata__"):
            info = header[name]
            digest.update(f"{name}|{info['dtype']}|{info['shape']};".encode())
            size = info["data_offsets"][1] - info["data_offsets"][0]
            dtypes[info["dtype"]] += 1
            layer = _LAYER.match(name)
            if layer and int(layer.group(1)) < len(layers):
                layers[int(layer.group(1))] += size
            elif name.startswith("model.embed_tokens."):
                embedding += size
                head += size if tied else 0
            elif name.startswith("model.norm.") or (name.startswith("lm_head.") and not tied):
                head += size
    floats = {k: v for k, v in dtypes.items() if k in _FLOATS}
    stored = _FLOATS[max(floats, key=floats.get)] if floats else "float32"
    return Footprint(digest.hexdigest()[:32], stored, tuple(layers), embedding, head)


def memory_bytes() -> int:
    """This machine's memory as MLX sees it (a Mac's unified memory), else the OS's."""
    from .plan import metal_gpu

    info = mx.device_info() if metal_gpu() else {}
    size = info.get("memory_size")
    if size:
        return int(size)
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def plan_parts(fp: Footprint, memory: list[int], counts: list[int] | None = None) -> list[Part]:
    """Contiguous parts, one per rank: `counts` layers each when given, else the split whose
    fullest rank (bytes held per byte of its memory) is as empty as possible."""
    total, ranks = len(fp.layers), len(memory)
    if counts is not None:
        if len(counts) != ranks:
            raise UsageError(f"--split has {len(counts)} entries for {ranks} ranks")
        if sum(counts) != total:
            raise UsageError(f"--split {','.join(map(str, counts))} must add up to {total} layers")
        bounds = [sum(counts[:r]) for r in range(ranks + 1)]
    else:
        if total < ranks:
            raise UsageError(f"the model has {total} layers: too few for {ranks} ranks")
        bounds = _balanced(fp, memory)
    return [Part(bounds[r], bounds[r + 1], total) for r in range(ranks)]


def _balanced(fp: Footprint, memory: list[int]) -> list[int]:
    """Layer boundaries minimising the largest load / memory ratio (a small dynamic program:
    ranks x layers^2 steps, nothing for a hundred layers and a few hosts)."""
    ranks, total = len(memory), len(fp.layers)
    prefix = [0]
    for size in fp.layers:
        prefix.append(prefix[-1] + size)

    def ratio(rank: int, start: int, stop: int) -> float:
        load = prefix[stop] - prefix[start]
        load += fp.embedding if rank == 0 else 0
        load += fp.head if rank == ranks - 1 else 0
        return load / max(memory[rank], 1)

    inf = float("inf")
    # best[r][b]: the best largest ratio of ranks 0..r holding layers 0..b-1; where[r][b] its cut
    best = [[inf] * (total + 1) for _ in range(ranks)]
    where = [[0] * (total + 1) for _ in range(ranks)]
    for b in range(1, total + 1):
        best[0][b] = ratio(0, 0, b)
    for r in range(1, ranks):
        for b in range(r + 1, total + 1):
            for a in range(r, b):
                value = max(best[r - 1][a], ratio(r, a, b))
                if value < best[r][b]:
                    best[r][b], where[r][b] = value, a
    bounds = [total]
    for r in range(ranks - 1, 0, -1):
        bounds.append(where[r][bounds[-1]])
    bounds.append(0)
    return bounds[::-1]
