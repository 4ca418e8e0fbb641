"""What a quantized checkpoint costs: its next-token distributions against the source's.

One teacher-forced pass over a fixed text, so numbers are comparable across widths and runs.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.nn as nn

from .errors import UsageError
from .loading import load_model
from .model import Model
from .quantize import checkpoint_bytes, count_parameters

# A fixed multilingual text (the languages Apertus is strong in, plus code) for `--report`.
FIDELITY_TEXT = (
    "The Alps stretch across eight countries, and their glaciers feed the Rhine and the Rhône. "
    "Die Schweiz hat vier Landessprachen: Deutsch, Französisch, Italienisch und Rätoromanisch. "
    "Le lac Léman est un des plus grands lacs d'Europe, partagé entre la Suisse et la France. "
    "Il Ticino è l'unico cantone interamente di lingua italiana, a sud del passo del San Gottardo. "
    "Il rumantsch vegn discurrì en il chantun Grischun e n'è betg ina lingua unitara. "
    "El aprendizaje automático permite a los ordenadores aprender patrones a partir de datos. "
    "瑞士以其钟表、巧克力和多语言文化而闻名。 "
    "def mean(xs):\n    return sum(xs) / len(xs)\n"
)


def _logprobs(model: Model, ids: mx.array) -> mx.array:
    logits = model(ids[None, :-1])[0].astype(mx.float32)
    return logits - mx.logsumexp(logits, axis=-1, keepdims=True)


def fidelity_report(
    src: Path, quantized: list[Path | str | Model], text_ids: list[int]
) -> list[dict[str, Any]]:
    """How far each quantized checkpoint's next-token distributions are from the source's.

    One teacher-forced forward pass over `text_ids`: mean KL(source || quantized), top-1
    agreement, perplexity of the text under each, and what each costs in bits per weight.
    The first row is the source itself.
    """
    if len(text_ids) < 2:
        raise UsageError("the fidelity text needs at least two tokens")
    ids = mx.array([int(i) for i in text_ids])
    targets = ids[1:]
    source = load_model(src)
    n_params = count_parameters(source)
    ref = _logprobs(source, ids)
    del source
    p_ref = mx.exp(ref)
    ppl_ref = _perplexity(ref, targets)

    rows = []
    for item in [src, *quantized]:
        if isinstance(item, nn.Module):
            model, name, size, bpw = item, type(item).__name__, None, None
        else:
            path = Path(item)
            model, name = load_model(path), path.name
            size, data = checkpoint_bytes(path)
            bpw = data * 8 / n_params
        quant = model.args.quantization or {}
        lp = ref if item is src else _logprobs(model, ids)
        kl = mx.mean(mx.sum(p_ref * (ref - lp), axis=-1))
        top1 = mx.mean(mx.argmax(lp, axis=-1) == mx.argmax(ref, axis=-1))
        ppl = _perplexity(lp, targets)
        rows.append(
            {
                "name": name,
                "bits": quant.get("bits"),
                "mode": quant.get("mode", "affine") if quant else None,
                "size_bytes": size,
                "bits_per_weight": bpw,
                "kl": max(float(kl), 0.0),
                "top1": float(top1),
                "ppl": ppl,
                "ppl_source": ppl_ref,
                "ppl_change": ppl / ppl_ref - 1,
            }
        )
    return rows


def _perplexity(logprobs: mx.array, targets: mx.array) -> float:
    nll = -mx.take_along_axis(logprobs, targets[:, None], axis=-1).mean()
    return math.exp(float(nll))


def format_report(rows: list[dict[str, Any]]) -> str:
    """The fidelity rows as a plain-text table."""
    lines = [
        f"{'checkpoint':<28} {'bits/w':>7} {'size':>10} {'KL':>10} {'top-1':>7} {'ppl':>9} "
        f"{'Δppl':>8}"
    ]
    for r in rows:
        bpw = f"{r['bits_per_weight']:.2f}" if r["bits_per_weight"] is not None else "-"
        size = human_size(r["size_bytes"]) if r["size_bytes"] is not None else "-"
        lines.append(
            f"{r['name'][:28]:<28} {bpw:>7} {size:>10} {r['kl']:>10.2e} {r['top1']:>7.1%} "
            f"{r['ppl']:>9.3f} {r['ppl_change']:>+8.2%}"
        )
    return "\n".join(lines)


def human_size(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1000
    raise AssertionError
