"""Speculative decoding: a small draft model proposes, the model verifies k tokens in one pass.

    draft = load_draft("path/to/Apertus-small", model, tokenizer, num_tokens=3)
    for event in generate(model, tokenizer, ids, draft=draft): ...

Each round the draft samples k tokens one at a time from its distribution q; the model reads
the last accepted token and the k drafts as one block (one forward pass, k + 1 positions) and
gets its distributions p at each. Drafted token x is accepted with probability
min(1, p(x) / q(x)); the first rejected one is replaced by a sample of
normalise(max(0, p - q)); if all k are accepted a bonus token comes from p. So a round yields
1 to k + 1 tokens, distributed exactly as the model alone would sample them (Leviathan et al.
2023, Chen et al. 2023). p and q are the distributions after the same processing (repetition
penalty, temperature, truncations: `sampling.make_distribution`), so top-p and friends keep
their meaning. At temperature 0 both are one-hot: a draft is accepted when it is the model's
argmax, and the output is the model's greedy output (up to float rounding in near-ties, as
a k-token block is not bit-identical to k single-token passes).

Rejected positions are trimmed from both caches (`KVCache.trim`). The draft keeps its own
cache, which knows its tokens, across calls, so a chat's next turn reads only what is new.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import mlx.core as mx

from .device import generation_stream
from .errors import DraftMismatchError, UsageError
from .forward import DEFAULT_MAX_TOKENS, Forward, PromptProgress
from .sampling import LogitsProcessor, SamplingParams, make_distribution

# Drafted tokens per round. With acceptance a, a round yields (1 - a^(k+1)) / (1 - a) tokens
# for k draft steps and one pass over k + 1 tokens. Where that pass costs about one step
# (decoding bound by reading the weights, as on a GPU) and a draft step a tenth of one, k = 3
# is the best k at a = 0.6 (1.67x) and within 2% of it at a = 0.7 (1.95x); larger k gain
# little more and lose more when the draft agrees less than hoped.
DEFAULT_NUM_DRAFT_TOKENS = 3
MAX_NUM_DRAFT_TOKENS = 16


class Draft:
    """A smaller model with the same tokenizer, its cache, and the ids that cache holds."""

    def __init__(self, model, num_tokens: int = DEFAULT_NUM_DRAFT_TOKENS):
        if not 1 <= num_tokens <= MAX_NUM_DRAFT_TOKENS:
            raise UsageError(
                f"the number of draft tokens must be in 1..{MAX_NUM_DRAFT_TOKENS}, got {num_tokens}"
            )
        self.model = model
        self.forward = Forward(model)  # compiled once, for every call with this draft
        self.num_tokens = num_tokens
        self.cache = model.make_cache()  # it knows the tokens it holds

    def check(self, model) -> None:
        """Refuse a target whose logits do not index the same vocabulary as the draft's."""
        ours, theirs = self.model.args.vocab_size, model.args.vocab_size
        if ours != theirs:
            raise DraftMismatchError(
                f"the draft model has {ours} vocabulary entries, the model {theirs}: "
                "a draft must use the model's tokenizer"
            )

    def reuse(self, prompt: Sequence[int]) -> None:
        """Keep the longest cached prefix of `prompt` (all of it but the last token at most)."""
        self.cache.keep_prefix(prompt)


def check_tokenizers(draft_tokenizer, tokenizer) -> None:
    """Refuse a draft whose token ids mean other text than the model's."""
    ours, theirs = draft_tokenizer.vocabulary(), tokenizer.vocabulary()
    if ours != theirs:
        differ = sum(ours.get(t) != theirs.get(t) for t in ours.keys() | theirs.keys())
        raise DraftMismatchError(
            f"the draft model's tokenizer differs from the model's ({differ} tokens have "
            "other ids): a draft must use the model's tokenizer"
        )


def load_draft(
    path_or_repo_id: str | Path,
    model,
    tokenizer,
    num_tokens: int = DEFAULT_NUM_DRAFT_TOKENS,
    dtype=None,
) -> Draft:
    """Load a draft for `model`, refused (DraftMismatchError) unless it shares the tokenizer."""
    from . import load

    draft_model, draft_tokenizer = load(path_or_repo_id, dtype=dtype)
    draft = Draft(draft_model, num_tokens)
    draft.check(model)
    check_tokenizers(draft_tokenizer, tokenizer)
    return draft


@dataclass
class DraftCounts:
    """Drafted and accepted tokens, for the stats: acceptance is accepted / drafted."""

    drafted: int = 0
    accepted: int = 0


def verify(
    p: mx.array, q: mx.array, drafts: mx.array, uniforms: mx.array, pick: Callable
) -> tuple[mx.array, mx.array]:
    """Rejection sampling of one round: (accepted count, the token after each prefix).

    p (k+1, V): the model's log-distributions after the last token and after each draft;
    q (k, V): the draft's, from which `drafts` (k,) were sampled; `uniforms` (k,) in [0, 1).
    Returns n, the number of leading drafts accepted, and (k+1,) tokens of which the n-th
    follows them: a sample of normalise(max(0, p - q)) at a rejection, of p after all k.
    Leading batch axes are allowed (many rounds at once, for testing the distribution).
    """
    k = drafts.shape[-1]
    p_x = mx.take_along_axis(p[..., :k, :], drafts[..., None], axis=-1)[..., 0]
    q_x = mx.take_along_axis(q, drafts[..., None], axis=-1)[..., 0]
    accepted = uniforms < mx.exp(p_x - q_x)
    n = mx.cumprod(accepted.astype(mx.int32), axis=-1).sum(axis=-1)
    residual = mx.maximum(mx.exp(p[..., :k, :]) - mx.exp(q), 0.0)
    # p == q leaves nothing (and then no draft is rejected but by rounding): p stands in
    empty = residual.sum(axis=-1, keepdims=True) <= 0
    rows = mx.where(empty, p[..., :k, :], mx.log(residual))
    return n, pick(mx.concatenate([rows, p[..., k:, :]], axis=-2))


def speculative_generate_step(
    prompt: Sequence[int],
    forward: Forward,
    cache,
    draft: Draft,
    *,
    params: SamplingParams,
    logits_processors: Sequence[LogitsProcessor] = (),
    max_tokens: int = DEFAULT_MAX_TOKENS,
    stop: Callable[[], bool] = lambda: False,
    progress: PromptProgress | None = None,
    counts: DraftCounts | None = None,
) -> Iterator[tuple[int, mx.array]]:
    """`generate_step` with a draft: the same (token, log-probabilities) stream and contract.

    The model reads all of the prompt but its last token up front (in stoppable chunks, as
    `generate_step`), then the draft does; the last token opens the first verified block.
    When the loop ends, for whatever reason, the cache holds every token fed to the model:
    the prompt and each yielded token but the last; the draft's cache a prefix of those.
    """
    progress = progress if progress is not None else PromptProgress()
    counts = counts if counts is not None else DraftCounts()
    draft_forward = draft.forward
    distribution = make_distribution(params)
    key = [mx.random.key(params.seed)] if params.seed is not None else None

    def subkey() -> mx.array | None:
        if key is None:
            return None
        key[0], sub = mx.random.split(key[0])
        return sub

    def pick(logprobs: mx.array) -> mx.array:
        if params.greedy:
            return mx.argmax(logprobs, axis=-1)
        return mx.random.categorical(logprobs, key=subkey())

    def uniforms(k: int) -> mx.array:
        if params.greedy:  # p(x)/q(x) is 1 or 0: accept exactly the model's argmax
            return mx.zeros((k,))
        return mx.random.uniform(shape=(k,), key=subkey())

    seq = [int(t) for t in prompt]  # the prompt, then every token yielded
    history = mx.array(seq, dtype=mx.int32) if logits_processors else None

    def process(logits: mx.array, drafts: list[mx.array], first: int = 0) -> mx.array:
        """Normalised log-probabilities (L, V) after the processors: row i is the next token's
        after the tokens yielded and drafts[: first + i]."""
        logits = logits.astype(mx.float32)
        if logits_processors:
            rows = []
            for i in range(logits.shape[0]):
                seen = drafts[: first + i]
                context = mx.concatenate([history, *seen]) if seen else history
                row = logits[i : i + 1]
                for processor in logits_processors:
                    row = processor(context, row)
                rows.append(row)
            logits = mx.concatenate(rows)
        return logits - mx.logsumexp(logits, axis=-1, keepdims=True)

    def count(n: int) -> None:
        progress.read, progress.seconds = n, time.perf_counter() - started

    def read(fwd: Forward, ids: Sequence[int], kv, report: Callable[[int], None]) -> bool:
        return not ids or fwd.prefill(ids, kv, stop, report) is not None

    started = time.perf_counter()
    draft.reuse(seq)
    fresh = len(seq) - cache.offset  # prompt tokens this call reads into the model
    try:
        with mx.stream(generation_stream(forward.model.plan)):
            if not read(forward, seq[cache.offset : -1], cache, count):
                return
            if not read(draft_forward, seq[draft.cache.offset : -1], draft.cache, lambda n: 0):
                return
            yielded = 0
            while yielded < max_tokens:
                k = min(draft.num_tokens, max_tokens - yielded - 1)
                # the draft reads what it has not seen (1 or 2 tokens), then its own samples
                inputs = mx.array([seq[draft.cache.offset :]], dtype=mx.int32)
                drafts, qs = [], []
                for _ in range(k):
                    logits = draft_forward(inputs, draft.cache)[:, -1, :]
                    q = distribution(process(logits, drafts, len(drafts)))
                    token = pick(q).astype(mx.int32)
                    drafts.append(token)
                    qs.append(q)
                    inputs = token[:, None]
                # the model reads the last token and the k drafts in one pass
                block = mx.concatenate([mx.array([seq[-1]], dtype=mx.int32), *drafts])
                logprobs = process(forward(block[None], cache)[0], drafts)
                p = distribution(logprobs)
                if k:
                    n, after = verify(p, mx.concatenate(qs), block[1:], uniforms(k), pick)
                else:
                    n, after = mx.array(0), pick(p)
                mx.eval(n, after, block, logprobs)
                n = n.item()
                tokens = block[1 : n + 1].tolist() + [after[n].item()]
                counts.drafted += k
                counts.accepted += n
                cache.trim(k - n)  # it keeps the last token and the accepted drafts
                draft.cache.truncate(min(draft.cache.offset, len(seq) + n))
                if yielded == 0:
                    progress.read = fresh
                for i, token in enumerate(tokens):
                    seq.append(token)
                    if history is not None:
                        history = mx.concatenate([history, mx.array([token], dtype=mx.int32)])
                    yielded += 1
                    yield token, logprobs[i]
                    if yielded == max_tokens or stop():
                        return
    finally:  # stopped mid-round too: keep what was fed, up to the last token yielded
        keep = len(seq) - 1
        cache.truncate(min(cache.offset, keep))
        draft.cache.truncate(min(draft.cache.offset, keep))
