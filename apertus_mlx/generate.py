"""Generation in two layers, as in mlx-lm: tokens, then text.

    for event in generate(model, tokenizer, prompt_ids, params=SamplingParams(temperature=0)):
        if isinstance(event, Chunk): print(event.text, end="")

`generate_step` deals in token ids only: prompt in, (token, log-probabilities) out, with the
sampler and logits processors passed in as callables; speculative decoding and benchmarks plug
in there. `generate` adds text on top: end tokens, the streaming detokenizer, stop strings,
events and stats. Both run the model through `Forward`: its one forward pass over the KV
cache, compiled once per shape.

Decoding samples step n+1 before step n's token reaches Python (`mx.async_eval`), so
detokenizing and printing overlap with the model's work. The prompt is read in chunks sized
from the measured speed, so a stop request (the stop event, Ctrl+C) lands within about
`PREFILL_BUDGET_S` even while a long prompt is being read, on a fast Mac and on a slow CPU.
"""

from __future__ import annotations

import functools
import threading
import time
from collections.abc import Callable, Generator, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING

import mlx.core as mx

from .cache import KVBuffers, KVCache
from .device import generation_stream, wired_limit
from .errors import UsageError
from .sampling import LogitsProcessor, SamplingParams, make_logits_processors, make_sampler
from .stopping import StopStrings

if TYPE_CHECKING:
    from .speculative import Draft

DEFAULT_MAX_TOKENS = 4096  # a real answer fits; mlx-lm's 100-256 cuts answers mid-sentence
PREFILL_BUDGET_S = 0.4  # the longest one layer of a prompt chunk should take: a stop's delay
MAX_CHUNK = 512  # prompt tokens per chunk at most: memory for one chunk of activations
FIRST_CHUNK = 8  # prompt tokens at least in a first chunk, before the speed is measured
# Floating-point operations per second assumed of a device before its speed is measured: low
# enough that a first chunk rarely overruns (it starts over smaller if it does).
ASSUMED_FLOPS = {"cpu": 5e9, "gpu": 2e12}


class Forward:
    """The model's forward pass over a KV cache, compiled once per input shape.

    The weights are inputs of the compiled graphs (`mx.compile(..., inputs=model.state)`), not
    constants captured in them, so updating the model (new weights, an adapter) is seen by the
    next call. Shapes change only when the cache grows a bucket (`KVCache.step`), so decoding
    compiles rarely. `prefill` reads prompt chunks with the same pass, uncompiled: chunk
    lengths vary, and at those sizes the matmuls, not the dispatch, take the time.
    """

    def __init__(self, model):
        self.model = model
        self._compiled = mx.compile(self._pure, inputs=model.state)
        self.tokens_per_s: float | None = None  # prompt reading speed, once measured

    def _pure(self, inputs, position, keys, values):
        kv = KVBuffers(list(keys), list(values), position)
        hidden = self.model.model(inputs, kv)
        return hidden, kv.keys, kv.values

    def _compiled_pass(self, inputs: mx.array, kv: KVBuffers) -> mx.array:
        hidden, kv.keys, kv.values = self._compiled(inputs, kv.position, kv.keys, kv.values)
        return hidden

    def __call__(self, inputs: mx.array, cache: KVCache) -> mx.array:
        """Logits (B, L, vocab) of the next token after each of `inputs` (B, L)."""
        return self.model.logits(cache.run(self._compiled_pass, inputs))

    def prefill(
        self,
        ids: Sequence[int],
        cache: KVCache,
        stop: Callable[[], bool] = lambda: False,
        progress: Callable[[int], None] = lambda n: None,
    ) -> mx.array | None:
        """Read `ids` into the cache; the logits (1, vocab) after the last one.

        Chunks are sized from the measured speed. One that should take longer than
        `PREFILL_BUDGET_S` is evaluated layer by layer, with `stop()` asked after every layer
        (sizing by layer rather than by chunk keeps chunks long enough for full-speed matmuls
        on a slow CPU, where one token through every layer can take longer than the budget);
        a quicker one runs as one graph and is asked after. The first chunk is sized from a
        cautious guess (`ASSUMED_FLOPS`) and starts over smaller if its first layer alone
        overruns the budget. A stop
        returns None with the cache holding the chunks read whole. `progress(n)` hears how
        many tokens are in so far.
        """
        layers = len(self.model.layers)
        done = 0
        while done < len(ids):
            size = min(self._chunk_size(layers), len(ids) - done)
            by_layer = size > self._rate() * PREFILL_BUDGET_S
            start = time.perf_counter()
            watch = _LayerWatch(stop, start, probing=self.tokens_per_s is None)
            forward = functools.partial(self.model.model, after_layer=watch if by_layer else None)
            try:
                hidden = cache.run(forward, mx.array([ids[done : done + size]]))
                mx.eval(cache.state())
            except _Stopped:
                return None
            except _TooSlow as slow:  # a first layer this slow: per token, per layer
                self.tokens_per_s = size / (slow.seconds * layers)
                continue
            if not by_layer and stop():
                return None
            done += size
            self._measure(size, time.perf_counter() - start)
            progress(done)
        return self.model.logits(hidden[:, -1, :])

    def _rate(self) -> float:
        """Prompt tokens per second: as measured, else a cautious guess from the model's size
        and the device."""
        if self.tokens_per_s is not None:
            return self.tokens_per_s
        a = self.model.args
        attention = (2 * a.num_attention_heads + 2 * a.num_key_value_heads) * a.head_dim
        flops = 2 * a.num_hidden_layers * a.hidden_size * (attention + 2 * a.intermediate_size)
        return ASSUMED_FLOPS["gpu" if self.model.plan.on_gpu else "cpu"] / flops

    def _chunk_size(self, layers: int) -> int:
        smallest = 1 if self.tokens_per_s is not None else FIRST_CHUNK
        return max(smallest, min(MAX_CHUNK, int(self._rate() * PREFILL_BUDGET_S * layers)))

    def _measure(self, tokens: int, seconds: float) -> None:
        if tokens < FIRST_CHUNK:  # fixed costs dominate: it would understate the speed
            return
        rate = tokens / max(seconds, 1e-6)
        # Grow at most 4x per chunk: a short first chunk is dominated by fixed costs.
        if self.tokens_per_s is not None:
            rate = min(rate, 4 * self.tokens_per_s)
        self.tokens_per_s = rate


class _LayerWatch:
    """`after_layer` for a prompt chunk read layer by layer: evaluates, asks `stop()`, and on
    a first chunk of unknown speed gives up early when one layer overruns the budget."""

    def __init__(self, stop: Callable[[], bool], start: float, probing: bool):
        self.stop, self.start, self.probing = stop, start, probing

    def __call__(self, h: mx.array) -> None:
        mx.eval(h)
        if self.stop():
            raise _Stopped
        if self.probing:
            seconds = time.perf_counter() - self.start
            if seconds > 2 * PREFILL_BUDGET_S:
                raise _TooSlow(seconds)
            self.probing = False


class _TooSlow(Exception):
    def __init__(self, seconds: float):
        self.seconds = seconds


class _Stopped(Exception):
    """Raised between two layers of a prompt chunk when a stop was requested."""


# --- the token layer ----------------------------------------------------------------------


@dataclass
class PromptProgress:
    """How much of the prompt the model has read, for truthful stats after a stop."""

    read: int = 0
    seconds: float = 0.0


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

    def count(n: int) -> None:
        progress.read, progress.seconds = n, time.perf_counter() - started

    started = time.perf_counter()
    with mx.stream(generation_stream()):
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


@dataclass
class Done:
    text: str
    stats: Stats
    tokens: list[int] = field(default_factory=list)


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
    not combine with a draft.
    """
    params = params or SamplingParams()
    if draft is not None and logits_processors:
        raise UsageError("constrained output does not work with a draft model")
    processors = [*make_logits_processors(params), *logits_processors]
    cache = cache if cache is not None else model.make_cache()
    cached = cache.offset
    prompt = check_prompt(prompt_ids, model, cached, max_tokens)
    max_tokens = min(max_tokens, model.args.max_position_embeddings - len(prompt))
    end = set(model.generation.eos_token_ids if end_tokens is None else end_tokens)
    stop = stop_event.is_set if stop_event is not None else lambda: False
    progress = PromptProgress()
    forward = forward if forward is not None else Forward(model)
    if draft is None:
        steps = generate_step(
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
            for token, _ in steps:
                if first_token_at is None:
                    first_token_at = time.perf_counter()
                tokens.append(token)
                if token in end:
                    reason = "stop"
                    break
                text, stopped_by_string = stops.feed(detok.add(token))
                parts.append(text)
                yield Chunk(text, token)
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
