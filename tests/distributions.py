"""Expected sampling distributions from transformers' own logits processors, and a chi-square
test of sampled token counts against them: the reference the sampling tests check against.

transformers' order: repetition penalty, then temperature, top-k, top-p (over what top-k left,
renormalised) and min-p, each as its `LogitsProcessor`/`LogitsWarper` class applies it in
`generate`. Computed in float64.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def expected_distribution(
    logits: np.ndarray,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    min_p: float = 0.0,
    repetition_penalty: float = 1.0,
    seen: Sequence[int] = (),
) -> np.ndarray:
    """Probabilities (vocab,) that `generate(do_sample=True, ...)` draws the next token from,
    after `logits` (vocab,) and the tokens `seen` so far."""
    import torch
    from transformers.generation import logits_process as lp

    processors = []
    if repetition_penalty != 1.0:
        processors.append(lp.RepetitionPenaltyLogitsProcessor(repetition_penalty))
    processors.append(lp.TemperatureLogitsWarper(temperature))
    if top_k:
        processors.append(lp.TopKLogitsWarper(top_k))
    if top_p < 1.0:
        processors.append(lp.TopPLogitsWarper(top_p))
    if min_p:
        processors.append(lp.MinPLogitsWarper(min_p))
    ids = torch.tensor([list(seen)], dtype=torch.long)
    scores = torch.tensor(np.asarray(logits, dtype=np.float64)[None])
    for processor in processors:
        scores = processor(ids, scores)
    return torch.softmax(scores, dim=-1)[0].numpy()


def penalised(logits: np.ndarray, seen: Sequence[int], penalty: float) -> np.ndarray:
    """transformers' repetition penalty applied to `logits` (vocab,) after tokens `seen`."""
    import torch
    from transformers.generation.logits_process import RepetitionPenaltyLogitsProcessor

    scores = torch.tensor(np.asarray(logits, dtype=np.float64)[None])
    ids = torch.tensor([list(seen)], dtype=torch.long)
    return RepetitionPenaltyLogitsProcessor(penalty)(ids, scores)[0].numpy()


def chi_square_p_value(counts: np.ndarray, probs: np.ndarray) -> float:
    """p-value of Pearson's chi-square test of `counts` against `probs`.

    A count where the probability is 0 fails outright (the sampler left the support). Cells
    expected fewer than 5 times are pooled into one, as the test's approximation needs.
    """
    import torch

    counts = np.asarray(counts, dtype=np.float64)
    probs = np.asarray(probs, dtype=np.float64)
    outside = counts[probs == 0].sum()
    assert outside == 0, f"{int(outside)} draws of tokens with probability 0"
    expected = counts.sum() * probs
    big = expected >= 5
    cells_o = list(counts[big]) + ([counts[~big & (probs > 0)].sum()] if (~big).any() else [])
    cells_e = list(expected[big]) + ([expected[~big].sum()] if (~big).any() else [])
    cells_o, cells_e = np.array(cells_o), np.array(cells_e)
    keep = cells_e > 0
    statistic = float((((cells_o - cells_e) ** 2)[keep] / cells_e[keep]).sum())
    dof = int(keep.sum()) - 1
    if dof < 1:
        return 1.0
    # the chi-square survival function is the regularised upper incomplete gamma function
    return float(torch.special.gammaincc(torch.tensor(dof / 2.0), torch.tensor(statistic / 2.0)))
