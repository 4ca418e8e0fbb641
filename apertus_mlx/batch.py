"""Continuous batching: several answers decode together, one forward pass per step.

Each answer is a turn like any other (`turn.Turn`); only its token layer differs:
`BatchDecoder.steps` stands in for `generate.generate_step`. A new answer reads its prompt
alone (with whatever prompt cache serves it), then joins the batch at the next step; a
finished or stopped one leaves. Every answer keeps its own KV cache, sampler, seed, logits
processors (penalties, a grammar), stop strings and output filter. The batched pass runs the
projections and the MLP for all rows at once, and attention over each row's own cache at its
own position (`RowsKV`): one attention for the rows whose caches have the same size, no
padding, so a row's answer is the one it gets alone.

Everything here runs on the thread that owns MLX (the server's scheduler). That thread
advances each answer's event generator until it yields `generate.PENDING` (its next token
is not computed yet), then runs `step()` for all of them.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import mlx.core as mx

from .cache import KVBuffers, KVCache, PlainBuffers
from .device import generation_stream
from .forward import DEFAULT_MAX_TOKENS, Forward, PromptProgress
from .generate import PENDING, token_sampler
from .kernels import norm_rope
from .sampling import LogitsProcessor

# Prompt tokens a joining answer reads between two steps of the others: a long prompt delays
# them by one chunk at a time, not by all of it.
PREFILL_CHUNK = 128


class RowsRotation:
    """RoPE for a batch of one token per row, each row at its own position. The plain path
    (the CPU's) rotates all rows at once with per-row tables, as `rope_tables` computes them;
    the fast one (`mx.fast.rope` takes one offset) rotates row by row."""

    fast = False  # never the fused Metal q/k/v kernel, which takes one position

    def __init__(self, rotations: list):
        self.rotations = rotations
        self.tables = None
        if not rotations[0].fast:
            positions = mx.concatenate([mx.reshape(r.position, (1,)) for r in rotations])
            angles = positions.astype(mx.float32)[:, None, None] * rotations[0].inv_freq
            cos, sin = mx.cos(angles), mx.sin(angles)  # (B, 1, head_dim/2)
            self.tables = tuple(
                mx.stack(pair, axis=2)[:, :, None] for pair in ((cos, cos), (-sin, sin))
            )  # (B, 1, 1, 2, head_dim/2), like rope_tables' (L, 1, 2, head_dim/2) per row

    def __call__(self, x: mx.array, norm: Any) -> mx.array:
        if self.tables is not None:
            return norm_rope(x, norm.weight, norm.eps, *self.tables)
        rows = [rotate(x[i : i + 1], norm) for i, rotate in enumerate(self.rotations)]
        return mx.concatenate(rows, axis=0)


class RowsKV:
    """What a batched decoding step reads and writes: one token per row, each row written to
    its own cache's buffers at its own position and attending over them alone (masked past
    its position, so the step compiles once per set of buffer sizes, not per position).

    Rows whose plain buffers have the same capacity attend together: their buffers are
    stacked, each row's keys and values scattered in at its position, and one attention runs
    over the stack with a per-row mask. Each row's result is the one it gets alone (the same
    buffer, the same mask; the batch dimension only repeats the computation), in far fewer
    operations than one attention per row, which is what a step of a small model spends its
    time on. Quantized buffers attend row by row."""

    def __init__(self, rows: Sequence[KVBuffers]):
        self.rows = list(rows)
        self.groups: list[list[int]] = []  # rows attending together, by buffer capacity
        if all(isinstance(kv.layout, PlainBuffers) for kv in self.rows):
            capacities: dict[int, list[int]] = {}
            for i, kv in enumerate(self.rows):
                capacities.setdefault(kv.keys[0][0].shape[2], []).append(i)
            self.groups = list(capacities.values())
            self.positions = mx.concatenate([kv.position for kv in self.rows])

    def rotation(self, rope: Any, length: int) -> RowsRotation:
        return RowsRotation([kv.rotation(rope, length) for kv in self.rows])

    def mask(self, length: int) -> None:
        return None  # each row's own, in `attend`

    def attend(self, layer: int, q, keys, values, scale: float, mask) -> mx.array:
        if not self.groups:
            rows = [
                kv.attend(
                    layer, q[i : i + 1], keys[i : i + 1], values[i : i + 1], scale, kv.mask(1)
                )
                for i, kv in enumerate(self.rows)
            ]
            return mx.concatenate(rows, axis=0)
        if len(self.groups) == 1:
            return self._attend_group(self.groups[0], layer, q, keys, values, scale)
        order = [i for group in self.groups for i in group]
        parts = []
        for group in self.groups:
            take = mx.array(group, dtype=mx.int32)
            part = (x[take] for x in (q, keys, values))
            parts.append(self._attend_group(group, layer, *part, scale))
        back = mx.array(sorted(range(len(order)), key=order.__getitem__), dtype=mx.int32)
        return mx.concatenate(parts, axis=0)[back]

    def _attend_group(self, group: list[int], layer: int, q, keys, values, scale: float):
        """One attention for rows of one capacity: stack, scatter the new keys and values in
        at each row's position, hand each row its part back, attend masked per row."""
        rows = [self.rows[i] for i in group]
        positions = (
            self.positions
            if len(group) == len(self.rows)
            else self.positions[mx.array(group, dtype=mx.int32)]
        )
        B, heads, _, dim = keys.shape
        at = mx.broadcast_to(positions[:, None, None, None], (B, heads, 1, dim))
        stacked = []
        for name, new in (("keys", keys), ("values", values)):
            whole = mx.concatenate([getattr(kv, name)[layer][0] for kv in rows], axis=0)
            whole = mx.put_along_axis(whole, at, new.astype(whole.dtype), axis=2)
            for i, kv in enumerate(rows):
                getattr(kv, name)[layer] = (whole[i : i + 1],)
            stacked.append(whole)
        capacity = stacked[0].shape[2]
        seen = mx.arange(capacity, dtype=mx.int32)[None, :] <= positions[:, None]
        keys, values = ((x,) for x in stacked)
        return rows[0].layout.attention(q, keys, values, scale, seen[:, None, None, :])


@dataclass(eq=False)
class _Row:
    cache: KVCache
    sample: Callable[[mx.array], tuple[mx.array, mx.array]]
    want: mx.array | None = None  # the token to feed at the next step
    ready: tuple[mx.array, mx.array] | None = None  # (next token, its log-probabilities)


class BatchDecoder:
    """The answers decoding together on one model (its compiled `Forward`)."""

    def __init__(self, forward: Forward):
        self.forward = forward
        self.rows: list[_Row] = []
        self._compiled: Callable | None = None

    def _graph(self, layout: Any) -> Callable:
        """The batched step, compiled (MLX traces it again for new shapes: a new number of
        rows or a cache grown by a bucket). The weights are inputs, as in `Forward`."""
        if self._compiled is None:
            model = self.forward.model

            def pure(inputs, positions, keys, values):
                rows = [
                    KVBuffers(layout, list(k), list(v), p)
                    for k, v, p in zip(keys, values, positions)
                ]
                hidden = model.model(inputs, RowsKV(rows))
                logits = model.logits(hidden[:, -1, :])
                return logits, [kv.keys for kv in rows], [kv.values for kv in rows]

            self._compiled = mx.compile(pure, inputs=model.state)
        return self._compiled

    def steps(
        self,
        prompt: Sequence[int],
        forward: Forward,
        cache: KVCache,
        *,
        sampler: Callable[[mx.array], mx.array],
        logits_processors: Sequence[LogitsProcessor] = (),
        max_tokens: int = DEFAULT_MAX_TOKENS,
        stop: Callable[[], bool] = lambda: False,
        progress: PromptProgress | None = None,
    ) -> Iterator[Any]:
        """`generate.generate_step` for an answer in the batch: (token, log-probabilities)
        per token, and `PENDING` while the batch computes the next one (or, while its prompt
        is read in `PREFILL_CHUNK`s, while the others take a step). The cache holds the
        prompt and every yielded token but the last."""
        progress = progress if progress is not None else PromptProgress()
        sample = token_sampler(prompt, sampler, logits_processors)

        started = time.perf_counter()

        def count(n: int) -> None:
            progress.read, progress.seconds = n, time.perf_counter() - started

        rest, read = list(prompt[cache.offset :]), 0
        while True:  # the prompt in chunks, the others' steps in between
            chunk = rest[read : read + PREFILL_CHUNK]
            with mx.stream(generation_stream(forward.model.plan)):
                logits = forward.prefill(chunk, cache, stop, lambda n, done=read: count(done + n))
            if logits is None:
                return
            read += len(chunk)
            if read == len(rest):
                break
            if self.rows:
                yield PENDING
        with mx.stream(generation_stream(forward.model.plan)):
            y, lp = sample(logits)
            mx.eval(y, lp)
        row = _Row(cache, sample)
        self.rows.append(row)
        try:
            for n in range(1, max_tokens + 1):
                yield y.item(), lp
                if n == max_tokens or stop():
                    return
                row.want = y
                while row.ready is None:
                    yield PENDING
                    if stop():
                        return
                (y, lp), row.ready = row.ready, None
        finally:
            self.rows.remove(row)

    @property
    def waiting(self) -> int:
        """Rows whose next token the next `step` computes."""
        return sum(row.want is not None for row in self.rows)

    def step(self) -> int:
        """One decoding step for every row waiting for its next token; how many there were."""
        rows = [row for row in self.rows if row.want is not None]
        if not rows:
            return 0
        with mx.stream(generation_stream(self.forward.model.plan)):
            if len(rows) == 1:  # alone: the compiled pass
                logits = self.forward(rows[0].want[:, None], rows[0].cache)[:, -1, :]
            else:
                inputs = mx.concatenate([row.want[:, None] for row in rows], axis=0)
                caches = [row.cache for row in rows]
                for cache in caches:
                    cache.reserve(cache.offset + 1)
                positions = [mx.array([c.offset], dtype=mx.int32) for c in caches]
                graph = self._graph(caches[0].layout)
                logits, keys, values = graph(
                    inputs,
                    positions,
                    [list(c.keys) for c in caches],
                    [list(c.values) for c in caches],
                )
                for i, cache in enumerate(caches):
                    kv = KVBuffers(cache.layout, keys[i], values[i], positions[i])
                    cache.commit(kv, inputs[i : i + 1])
            out = [row.sample(logits[i : i + 1]) for i, row in enumerate(rows)]
            mx.eval([a for pair in out for a in pair])
        for row, pair in zip(rows, out):
            row.ready, row.want = pair, None
        return len(rows)
