"""Generation in two layers, as in mlx-lm: tokens, then text.

    for event in generate(model, tokenizer, prompt_ids, params=SamplingParams(temperature=0)):
        if isinstance(event, Chunk): print(event.text, end="")

`generate_step` deals in token ids only: prompt in, (token, log-probabilities) out, with the
sampler and logits processors passed in as callables; speculative decoding and benchmarks plug
in there. `generate` adds text on top: end tokens, the streaming detokenizer, stop strings,
events and stats. Both run the model through `forward.Forward`: its one forward pass over the
KV cache, compiled once per shape, with the prompt read in stoppable chunks.

Decoding samples step n+1 before step n's token reaches Python (`mx.async_eval`), so
detokenizing and printing overlap with the model's work.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Generator, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING

import mlx.core as mx

from .cache import KVCache
from .device import generation_stream, wired_limit
from .errors import UsageError
from .forward import DEFAULT_MAX_TOKENS, Forward, PromptProgress
from .sampling import (
    LogitsProcessor,
    SamplingParams,
    make_logits_processors,
    make_sampler,
    top_logprobs,
)
from .stopping import StopStrings

if TYPE_CHECKING:
    from .speculative import Draft

__all__ = ["DEFAULT_MAX_TOKENS", "Chunk", "Done", "Event", "Forward", "Stats", "generate"]


# --- the token layer ----------------------------------------------------------------------


def token_sampler(
    prompt: Sequence[int],
    sampler: Callable[[mx.array], mx.array],
    logits_processors: Sequence[LogitsProcessor] = (),
) -> Callable[[mx.array], tuple[mx.array, mx.array]]:
    """(logits (1, vocab)) -> (token, log-probabilities (vocab,)), in float32; the logits
    processors see the prompt and every token drawn so far."""
    tokens = mx.array(prompt, dtype=mx.int32) if logits_processors else None

    def sample(logits: mx.array) -> tuple[mx.array, mx.array]:
        nonlocal tokens
        logits = logits.astype(mx.float32)
        for processor in logits_processors:
            logits = processor(tokens, logits)
        logprobs = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
        token = sampler(logprobs)
        if tokens is not None:
            tokens = mx.concatenate([tokens, token.astype(mx.int32)])
        return token, logprobs.squeeze(0)

    return sample


def generate_step(
    prompt: Sequence[int],
    forward: Forward,
    cache: KVCache,
    *,
    sampler: Callable[[mx.array], mx.array],
    logits_processors: Sequence[LogitsProcessor] = (),
    max_tokens: int = DEFAULT_MAX_TOKENS,
    stop: Callable[[], bool] = lambda: False,
    progress: PromptProgress | None = None,
) -> Iterator[tuple[int, mx.array]]:
    """Yield (token id, log-probabilities (vocab,)) for each generated token.

    The part of `prompt` that `cache` does not hold yet is read into it (all of it feeds the
    logits processors). The loop ends after
    `max_tokens`, when `stop()` is true (asked between prompt chunks and after each token),
    or when the consumer stops iterating. The cache then holds every token fed to the model:
    the prompt and each yielded token but the last.
    """
    progress = progress if progress is not None else PromptProgress()
    sample = token_sampler(prompt, sampler, logits_processors)

    def count(n: int) -> None:
        progress.read, progress.seconds = n, time.perf_counter() - started

    started = time.perf_counter()
    with mx.stream(generation_stream(forward.model.plan)):
        # The whole prompt and the answer budget: reserved once, not grown step by step.
        cache.reserve(len(prompt) + 1, most=len(prompt) + max_tokens)
        logits = forward.prefill(prompt[cache.offset :], cache, stop, count)
        if logits is None:
            return
        y, lp = sample(logits)
        mx.async_eval(y, lp)
        for n in range(1, max_tokens + 1):
            if n < max_tokens:  # queue the next step before waiting for this token
                next_y, next_lp = sample(forward(y[:, None], cache)[:, -1, :])
                mx.async_eval(next_y, next_lp)
            yield y.item(), lp
            if n == max_tokens or stop():
                return
            y, lp = next_y, next_lp


# --- the text layer -----------------------------------------------------------------------


@dataclass
class Stats:
    prompt_tokens: int = 0
    cached_tokens: int = 0  # prompt tokens served from the cache
    prefilled_tokens: int = 0  # prompt tokens read this time (fewer if stopped while reading)
    generated_tokens: int = 0
    ttft_s: float | None = None  # None when no token came
    prefill_tps: float = 0.0
    decode_tps: float = 0.0
    peak_memory_gb: float = 0.0
    finish_reason: str = "stop"
    # The prompt is the full rendering of the conversation, not its past answers' own tokens:
    # the template renders history differently (see `prompt.conversation_ids`).
    history_rerendered: bool = False
    num_draft_tokens: int = 0  # k of speculative decoding; 0: no draft model
    draft_tokens: int = 0  # tokens the draft proposed
    accepted_tokens: int = 0  # of those, accepted by the model
    acceptance_rate: float | None = None  # accepted / drafted, None without a draft

    def as_dict(self) -> dict:
        return asdict(self)


@dataclass
class Chunk:
    """Newly decoded text (possibly empty: a token may end mid-character) and its token id."""

    text: str
    token: int
    # With `generate(logprobs=k)`: this token's log-probability and the k most likely
    # (id, log-probability) at its step.
    logprob: float | None = None
    top_logprobs: list[tuple[int, float]] | None = None


@dataclass
class Done:
    text: str
    stats: Stats
    tokens: list[int] = field(default_factory=list)
    # Set by a turn that parses Apertus's format (`turn.py`): the deliberation apart from
    # the answer `text`, and the calls made (`format.ToolCall`s).
    reasoning: str | None = None
    tool_calls: list = field(default_factory=list)


class _Pending:
    """What a token source yields (and `generate` passes on) while this answer's next token
    is being computed with other answers' (`batch.BatchDecoder`): come back later."""

    pending = True  # how layers that know nothing of this module recognize it

    def __repr__(self) -> str:
        return "PENDING"


PENDING = _Pending()

Event = Chunk | Done


def check_prompt(prompt: Sequence[int], model, cached: int, max_tokens: int) -> list[int]:
    """The prompt as a list of valid ids; what no model could answer raises UsageError."""
    vocab, context = model.args.vocab_size, model.args.max_position_embeddings
    try:
        ids = [int(i) for i in prompt]
    except (TypeError, ValueError):
        raise UsageError("prompt ids must be integers") from None
    bad = [i for i in ids if not 0 <= i < vocab]
    if bad:
        raise UsageError(f"prompt id {bad[0]} is outside the model's vocabulary (0..{vocab - 1})")
    if not ids or cached >= len(ids):
        raise UsageError("nothing to generate from: the prompt is empty")
    if len(ids) >= context:
        raise UsageError(f"the prompt has {len(ids)} tokens; the model's context is {context}")
    if max_tokens < 1:
        raise UsageError(f"max_tokens must be at least 1, got {max_tokens}")
    return ids


def generate(
    model,
    tokenizer,
    prompt_ids: Sequence[int],
    *,
    params: SamplingParams | None = None,
    max_tokens: int = DEFAULT_MAX_TOKENS,
    stop_strings: Sequence[str] = (),
    end_tokens: Sequence[int] | None = None,
    cache: KVCache | None = None,
    stop_event: threading.Event | None = None,
    draft: Draft | None = None,
    forward: Forward | None = None,
    logits_processors: Sequence[LogitsProcessor] = (),
    logprobs: int | None = None,
    steps: Callable | None = None,
) -> Iterator[Event]:
    """Stream the continuation of `prompt_ids` as `Chunk`s, then one `Done`.

    `cache` may already hold the first `cache.offset` prompt tokens (a chat's earlier turns);
    only the rest is read. `end_tokens` default to the checkpoint's (`model.generation`). The
    last event is always `Done`, with finish_reason stop, length or interrupted (the stop
    event, Ctrl+C). A `draft` (`speculative.Draft`) decodes speculatively: the same
    distribution of answers, faster when the draft often guesses the model's next tokens.
    Pass the model's `Forward` to reuse its compiled graphs across calls (a chat session
    does); without one, this call compiles its own (tens of milliseconds).
    `logits_processors` run after the sampling settings' own (e.g. a grammar's mask from
    `constrained.Constraint.processor`); they follow one answer token by token, so they do
    not combine with a draft. With `logprobs` (k >= 0) each `Chunk` carries its token's
    log-probability and the k most likely alternatives. `steps` replaces the token layer
    (`generate_step`'s signature): a batch decoder's source, which may yield `PENDING`
    (passed on as an event) while other answers share the step.
    """
    params = params or SamplingParams()
    if draft is not None and logits_processors:
        raise UsageError("constrained output does not work with a draft model")
    processors = [*make_logits_processors(params), *logits_processors]
    cache = cache if cache is not None else model.make_cache()
    if model.pipeline is not None:  # split across processes: their caches may hold less
        model.pipeline.reconcile(cache)
    cached = cache.offset
    prompt = check_prompt(prompt_ids, model, cached, max_tokens)
    max_tokens = min(max_tokens, model.args.max_position_embeddings - len(prompt))
    end = set(model.generation.eos_token_ids if end_tokens is None else end_tokens)
    stop = stop_event.is_set if stop_event is not None else lambda: False
    progress = PromptProgress()
    forward = forward if forward is not None else Forward(model)
    if model.pipeline is not None:  # the last process samples: settings travel, not callables
        if draft is not None or logits_processors:
            raise UsageError("a draft model or constrained output does not run across hosts")
        steps = model.pipeline.generate_step(
            prompt,
            forward,
            cache,
            params=params,
            max_tokens=max_tokens,
            stop=stop,
            progress=progress,
        )
    elif draft is None:
        steps = (steps or generate_step)(
            prompt,
            forward,
            cache,
            sampler=make_sampler(params),
            logits_processors=processors,
            max_tokens=max_tokens,
            stop=stop,
            progress=progress,
        )
    else:
        from .speculative import DraftCounts, speculative_generate_step

        draft.check(model)
        counts = DraftCounts()
        steps = speculative_generate_step(
            prompt,
            forward,
            cache,
            draft,
            params=params,
            logits_processors=make_logits_processors(params),
            max_tokens=max_tokens,
            stop=stop,
            progress=progress,
            counts=counts,
        )
    detok = tokenizer.detokenizer()
    stops = StopStrings(stop_strings)
    mx.reset_peak_memory()

    tokens: list[int] = []
    parts: list[str] = []
    reason = "length"
    stopped_by_string = False
    start = time.perf_counter()
    first_token_at = None
    with wired_limit(model):
        try:
            for step in steps:
                if step is PENDING:
                    yield PENDING
                    continue
                token, lp = step
                if first_token_at is None:
                    first_token_at = time.perf_counter()
                tokens.append(token)
                if token in end:
                    reason = "stop"
                    break
                text, stopped_by_string = stops.feed(detok.add(token))
                parts.append(text)
                chunk = Chunk(text, token)
                if logprobs is not None:
                    chunk.logprob, chunk.top_logprobs = top_logprobs(lp, token, logprobs)
                yield chunk
                if stopped_by_string:
                    reason = "stop"
                    break
            else:
                if stop():
                    reason = "interrupted"
        except KeyboardInterrupt:
            reason = "interrupted"
        finally:
            steps.close()
    end_at = time.perf_counter()

    if not stopped_by_string:  # flush a held-back partial character or stop-string prefix
        tail, _ = stops.feed(detok.finalize())
        tail += stops.flush()
        if tail:
            parts.append(tail)
            yield Chunk(tail, -1)
    stats = Stats(prompt_tokens=len(prompt), cached_tokens=cached, finish_reason=reason)
    stats.prefilled_tokens = progress.read
    stats.generated_tokens = len(tokens)
    if first_token_at is not None:
        stats.ttft_s = first_token_at - start
        stats.prefill_tps = progress.read / max(stats.ttft_s, 1e-9)
    elif progress.read:  # stopped while reading the prompt: every chunk read was evaluated
        stats.prefill_tps = progress.read / max(progress.seconds, 1e-9)
    if len(tokens) > 1:
        stats.decode_tps = (len(tokens) - 1) / max(end_at - first_token_at, 1e-9)
    stats.peak_memory_gb = mx.get_peak_memory() / 1e9
    if draft is not None:
        stats.num_draft_tokens = draft.num_tokens
        stats.draft_tokens, stats.accepted_tokens = counts.drafted, counts.accepted
        if counts.drafted:
            stats.acceptance_rate = counts.accepted / counts.drafted
    yield Done("".join(parts), stats, tokens)


def wind_down(events: Generator[Event, None, None]) -> Iterator[Event]:
    """The rest of `generate`'s events after a Ctrl+C that reached the consumer instead.

    KeyboardInterrupt is raised wherever Python is running; when that is the consumer's code
    (writing a chunk, say), this hands it to the generator, which ends as if interrupted
    itself: held-back text flushed, `Done` last.
    """
    try:
        yield events.throw(KeyboardInterrupt())
    except StopIteration:
        return
    yield from events
