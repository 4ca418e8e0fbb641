"""Prefill and decode: prompt ids in, a stream of events out.

    for event in generate(model, tokenizer, prompt_ids, params=SamplingParams(temperature=0)):
        if isinstance(event, Chunk): print(event.text, end="")

The loop samples step n+1 before it hands step n's token to Python (`mx.async_eval`), so
detokenizing and printing overlap with the model's work. Prefill runs in chunks, so a long
prompt needs memory for one chunk of activations at a time.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Generator, Iterator, Sequence
from dataclasses import asdict, dataclass, field

import mlx.core as mx

from .cache import KVCache
from .errors import UsageError
from .sampling import REPETITION_WINDOW, Sampler, SamplingParams
from .stopping import StopStrings

DEFAULT_MAX_TOKENS = 4096  # a real answer fits; mlx-lm's 100-256 cuts answers mid-sentence
PREFILL_STEP = 512


@dataclass
class Stats:
    prompt_tokens: int = 0
    cached_tokens: int = 0
    generated_tokens: int = 0
    ttft_s: float = 0.0
    prefill_tps: float = 0.0
    decode_tps: float = 0.0
    peak_memory_gb: float = 0.0
    finish_reason: str = "stop"

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


class DecodeStep:
    """One token in, next-token logits out; the plain path, kept beside the fast one."""

    def __init__(self, model):
        self.model = model

    def prefill(self, ids: mx.array, cache: KVCache) -> mx.array:
        """Feed (1, L) ids; the logits after the last one (lazy: unused ones cost nothing)."""
        hidden = self.model.model(ids, cache)
        return self.model.logits(hidden[:, -1, :])

    def __call__(self, token: mx.array, cache: KVCache) -> mx.array:
        return self.prefill(token.reshape(1, 1), cache)


def default_step(model) -> DecodeStep:
    """The compiled step, built once per model (compiling again would trace again)."""
    step = getattr(model, "_decode_step", None)
    if step is None:
        from .fast_decode import CompiledDecodeStep

        step = model._decode_step = CompiledDecodeStep(model)
    return step


def generate(
    model,
    tokenizer,
    prompt_ids: Sequence[int],
    *,
    params: SamplingParams | None = None,
    max_tokens: int = DEFAULT_MAX_TOKENS,
    stop_strings: Sequence[str] = (),
    cache: KVCache | None = None,
    stop_event: threading.Event | None = None,
    step: DecodeStep | None = None,
) -> Iterator[Event]:
    """Stream the continuation of `prompt_ids`.

    `cache` may already hold the first `cache.offset` prompt tokens (a chat's earlier turns);
    only the rest is prefilled. On return the cache holds every token fed to the model.
    The last event is always `Done`, with finish_reason stop, length or interrupted.
    """
    params = params or SamplingParams()
    cache = cache if cache is not None else model.make_cache()
    step = step or default_step(model)
    prompt = list(prompt_ids)
    cached = cache.offset
    context = model.args.max_position_embeddings
    if not prompt or cached >= len(prompt):
        raise UsageError("nothing to generate from: the prompt is empty")
    if len(prompt) >= context:
        raise UsageError(f"the prompt has {len(prompt)} tokens; the model's context is {context}")
    max_tokens = min(max_tokens, context - len(prompt))

    stats = Stats(prompt_tokens=len(prompt), cached_tokens=cached)
    sampler = Sampler(params)
    detok = tokenizer.detokenizer()
    stops = StopStrings(stop_strings)
    eos = set(model.generation.eos_token_ids)
    use_history = params.repetition_penalty != 1.0
    history = mx.array(prompt[-REPETITION_WINDOW:]) if use_history else None
    mx.reset_peak_memory()

    tokens: list[int] = []
    parts: list[str] = []
    reason = "length"
    stopped_by_string = False
    start = first_token_at = time.perf_counter()
    try:
        y = sampler(_prefill(step, prompt[cached:], cache), history)
        mx.async_eval(y)
        while len(tokens) < max_tokens:
            if use_history:
                history = mx.concatenate([history[-(REPETITION_WINDOW - 1) :], y])
            more = len(tokens) + 1 < max_tokens
            if more:  # queue the next step before waiting for this token
                next_y = sampler(step(y, cache), history)
                mx.async_eval(next_y)
            token = y.item()
            if not tokens:
                first_token_at = time.perf_counter()
            tokens.append(token)
            if token in eos:
                reason = "stop"
                break
            text, stopped_by_string = stops.feed(detok.add(token))
            parts.append(text)
            yield Chunk(text, token)
            if stopped_by_string:
                reason = "stop"
                break
            if stop_event is not None and stop_event.is_set():
                reason = "interrupted"
                break
            y = next_y if more else y
    except KeyboardInterrupt:
        reason = "interrupted"
    end = time.perf_counter()

    if not stopped_by_string:  # flush a held-back partial character or stop-string prefix
        tail, _ = stops.feed(detok.finalize())
        tail += stops.flush()
        if tail:
            parts.append(tail)
            yield Chunk(tail, -1)
    stats.finish_reason = reason
    stats.generated_tokens = len(tokens)
    stats.ttft_s = first_token_at - start
    stats.prefill_tps = (len(prompt) - cached) / max(stats.ttft_s, 1e-9)
    if len(tokens) > 1:
        stats.decode_tps = (len(tokens) - 1) / max(end - first_token_at, 1e-9)
    stats.peak_memory_gb = mx.get_peak_memory() / 1e9
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


def _prefill(step: DecodeStep, ids: list[int], cache: KVCache) -> mx.array:
    """Feed `ids` in chunks; return the logits after the last one."""
    while len(ids) > PREFILL_STEP:
        step.prefill(mx.array([ids[:PREFILL_STEP]]), cache)
        mx.eval([k for k in cache.keys + cache.values if k is not None])
        mx.clear_cache()
        ids = ids[PREFILL_STEP:]
    return step.prefill(mx.array([ids]), cache)
