"""The model's forward pass over a KV cache: compiled once per shape, and a prompt read in
chunks that a stop request can interrupt.

`Forward` is what generation, speculative decoding and the benchmarks run the model through;
it sits below all of them (they import it, it imports none of them).
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import mlx.core as mx

from .cache import KVBuffers, KVCache, Layout

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
        self._compiled: dict[Layout, Callable] = {}  # one graph family per cache layout
        self.tokens_per_s: float | None = None  # prompt reading speed, once measured

    def _graph(self, layout: Layout) -> Callable:
        if layout not in self._compiled:

            def pure(inputs, position, keys, values):
                kv = KVBuffers(layout, list(keys), list(values), position)
                hidden = self.model.model(inputs, kv)
                return hidden, kv.keys, kv.values

            self._compiled[layout] = mx.compile(pure, inputs=self.model.state)
        return self._compiled[layout]

    def _compiled_pass(self, inputs: mx.array, kv: KVBuffers) -> mx.array:
        graph = self._graph(kv.layout)
        hidden, kv.keys, kv.values = graph(inputs, kv.position, kv.keys, kv.values)
        return hidden

    def __call__(self, inputs: mx.array, cache: KVCache) -> mx.array:
        """Logits (B, L, vocab) of the next token after each of `inputs` (B, L)."""
        return self.model.logits(self.hidden(inputs, cache))

    def hidden(self, inputs: mx.array, cache: KVCache) -> mx.array:
        """The model's (or its part's, see `model.Part`) output for `inputs`, compiled."""
        return cache.run(self._compiled_pass, inputs)

    def prefill(
        self,
        ids: Sequence[int],
        cache: KVCache,
        stop: Callable[[], bool] = lambda: False,
        progress: Callable[[int], None] = lambda n: None,
    ) -> mx.array | None:
        """Read `ids` into the cache; the logits (1, vocab) after the last one (see `read`)."""
        hidden = self.read(ids, cache, stop, progress)
        return None if hidden is None else self.model.logits(hidden[:, -1, :])

    def read(
        self,
        ids: Sequence[int],
        cache: KVCache,
        stop: Callable[[], bool] = lambda: False,
        progress: Callable[[int], None] = lambda n: None,
        on_chunk: Callable[[Sequence[int], mx.array], None] | None = None,
    ) -> mx.array | None:
        """Read `ids` into the cache; the output (1, chunk, hidden) for the last chunk.

        Chunks are sized from the measured speed. One that should take longer than
        `PREFILL_BUDGET_S` is evaluated layer by layer, with `stop()` asked after every layer
        (sizing by layer rather than by chunk keeps chunks long enough for full-speed matmuls
        on a slow CPU, where one token through every layer can take longer than the budget);
        a quicker one runs as one graph and is asked after. The first chunk is sized from a
        cautious guess (`ASSUMED_FLOPS`) and starts over smaller if its first layer alone
        overruns the budget. A stop returns None with the cache holding the chunks read whole.
        `progress(n)` hears how many tokens are in so far, and `on_chunk(chunk ids, output)`
        sees each chunk once it is read (a pipeline hands it on to the next process).
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
                mx.eval(cache.arrays())
            except _Stopped:
                return None
            except _TooSlow as slow:  # a first layer this slow: per token, per layer
                self.tokens_per_s = size / (slow.seconds * layers)
                continue
            if not by_layer and stop():
                return None
            self._measure(size, time.perf_counter() - start)
            if on_chunk is not None:
                on_chunk(ids[done : done + size], hidden)
            done += size
            progress(done)
            if done < len(ids):
                # The chunk's activations are garbage now: hand their buffers back before the
                # next chunk allocates its own, so a long prompt's peak stays one chunk's.
                mx.clear_cache()
        return hidden

    def _rate(self) -> float:
        """Prompt tokens per second: as measured, else a cautious guess from the model's size
        and the device."""
        if self.tokens_per_s is not None:
            return self.tokens_per_s
        a = self.model.args
        attention = (2 * a.num_attention_heads + 2 * a.num_key_value_heads) * a.head_dim
        flops = 2 * len(self.model.layers) * a.hidden_size * (attention + 2 * a.intermediate_size)
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


@dataclass
class PromptProgress:
    """How much of the prompt the model has read, for truthful stats after a stop."""

    read: int = 0
    seconds: float = 0.0
