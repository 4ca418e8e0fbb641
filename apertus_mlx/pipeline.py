"""Pipeline parallel: rank 0 drives a model whose layers are split across ranks.

Each rank holds one contiguous block of layers (`model.Part`) and only that block's KV cache.
`Pipeline` is rank 0's side: it loads a model on every rank (`handshake.py` checks they agree
first), hands each prompt chunk on as rank 0's layers finish it, sends one hidden state per
decoded token and receives the token the last rank sampled (`wire.py` is the message format;
`servant.py` the other ranks' side). Calling the model, `generate.generate` and everything
built on them therefore run across the ranks unchanged.

Rank 0's KV caches are paired with the other ranks' by slot: a `KVCache` gets a slot the first
time it is used here, and when it is garbage-collected the slot is freed on every rank.
"""

from __future__ import annotations

import dataclasses
import gc
import time
import weakref
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import mlx.core as mx

from .device import generation_stream
from .errors import ApertusError, UsageError
from .handshake import Agreement, describe, negotiate, ready
from .wire import EXIT, IDS, LOGITS, NO_CACHE, SAMPLE, STEP, Link, uninterrupted

if TYPE_CHECKING:
    from .cache import KVCache
    from .distributed import Cluster
    from .generate import Forward, PromptProgress
    from .model import Model
    from .sampling import SamplingParams


class Pipeline:
    """Rank 0's handle on the other ranks: loads, prompt chunks, decode steps, stop.

    `apertus_mlx.load` calls `load` when this process is rank 0 of several
    (`distributed.active()`); the model it returns has this pipeline attached, and calling the
    model, `generate.generate` and so every front end built on them run through it.
    """

    def __init__(self, cluster: Cluster, split: list[int] | None = None):
        self.cluster = cluster
        self.link = Link(cluster)
        self.split = split
        self.model: Model | None = None
        self.agreement: Agreement | None = None
        self._slots: weakref.WeakKeyDictionary[KVCache, int] = weakref.WeakKeyDictionary()
        self._held: dict[int, int] = {}  # slot -> positions the other ranks hold
        self._freed: list[int] = []
        self._next_slot = 0
        self._closed = False
        self._resting = False  # the other ranks wait for the bell, not for a message
        self._depth = 0  # units on the wire being queued (see `_speaking`)
        self._rest_pending = False

    @property
    def size(self) -> int:
        return self.cluster.size

    # --- loading ----------------------------------------------------------------------------

    def load(self, name: str, path: Path, dtype: Any = None, fuse: bool = True) -> Model:
        """Every rank loads its part of the model at `name` (as each host resolves it: a
        catalog alias or repo id from its own cache, or this same directory)."""

        if isinstance(dtype, mx.Dtype):
            dtype = str(dtype).removeprefix("mlx.core.")
        given = Path(str(name)).expanduser()
        sent = str(given.resolve()) if given.is_dir() else str(name)
        self.model = None  # the previous model's parts go on every rank, before the new
        gc.collect()  # one is read (a model and its compiled passes hold each other)
        mx.reset_peak_memory()
        with self.transport():
            try:
                self._send_json({"op": "load", "model": sent, "dtype": dtype, "fuse": fuse,
                                 "split": self.split})  # fmt: skip
                return self._load(path, dtype, fuse)
            finally:
                self.rest()

    def _load(self, path: Path, dtype: str | None, fuse: bool) -> Model:
        from .loading import load_model

        agreement = negotiate(self.cluster, path, dtype, self.split)
        if isinstance(agreement, ApertusError):
            raise agreement
        model, problem = None, None
        try:
            model = load_model(path, dtype=agreement.dtype, fuse=fuse, part=agreement.parts[0])
        except ApertusError as e:
            problem = e
        failure = ready(self.cluster, model, problem)
        if failure is not None:
            raise failure
        model.pipeline = self
        self.model, self.agreement = model, agreement
        self._slots = weakref.WeakKeyDictionary()
        self._held.clear()
        return model

    def describe(self) -> str:
        """One line for `--stats`: the hosts and their layers."""
        if self.agreement is None:
            return f"{self.size} ranks"
        parts = " | ".join(
            f"{host} {p.start}-{p.stop - 1}"
            for host, p in zip(self.agreement.hosts, self.agreement.parts)
        )
        return f"{self.size} ranks, layers {parts}"

    def ranks(self) -> list[dict]:
        """Every rank's host, layers, parameter bytes and memory: active now, and the peak
        since the model's load began."""
        with self.transport():
            self._send_json({"op": "describe"})
            try:
                return self.cluster.exchange(describe(self.cluster, self.model))
            finally:
                self.rest()

    # --- running ----------------------------------------------------------------------------

    def logits(self, inputs: mx.array, cache: KVCache | None = None) -> mx.array:
        """`model(inputs, cache)` across the ranks: logits (1, L, vocab), float32."""
        if inputs.ndim != 2 or inputs.shape[0] != 1:
            raise UsageError("a model split across hosts reads one sequence at a time (batch 1)")
        length = inputs.shape[1]
        ids = inputs.astype(mx.int32)
        with self.transport():
            if cache is None:
                hidden, slot, position, bits = self.model.model(inputs), NO_CACHE, 0, 0
            else:
                self.reconcile(cache)
                slot, position, bits = self._slot(cache), cache.offset, cache.bits or 0
                hidden = cache.run(self.model.model, inputs)
            answer = ((1, length, self.model.args.vocab_size), mx.float32)
            try:
                return self.link.wait(self._step(ids, hidden, position, slot, IDS | LOGITS,
                                                 bits, answer=answer))  # fmt: skip
            finally:
                self.rest()

    def reconcile(self, cache: KVCache) -> None:
        """Forget what `cache` holds beyond what the other ranks hold for it (a cache restored
        from disk holds this rank's layers only; one new here holds nothing elsewhere)."""
        slot = self._slots.get(cache)
        held = self._held.get(slot, 0) if slot is not None else 0
        if cache.offset > held:
            cache.truncate(held)

    def generate_step(
        self,
        prompt: Sequence[int],
        forward: Forward,
        cache: KVCache,
        *,
        params: SamplingParams,
        max_tokens: int,
        stop: Callable[[], bool],
        progress: PromptProgress,
    ) -> Iterator[tuple[int, None]]:
        """`generate.generate_step` across the ranks: (token, None) per token (the log-
        probabilities stay on the last rank).

        Rank 0 reads prompt chunks through its layers and hands each on as it is done; the
        last rank samples after the last chunk and sends the token round. Decoding queues step
        n + 1 before token n reaches the caller, as on one process. A stop lands between
        chunks or layers while the prompt is read and between tokens after.
        """
        slot, bits = self._slot(cache), cache.bits or 0
        self._send_json({"op": "begin", "slot": slot, "params": dataclasses.asdict(params)})
        ids = list(prompt[cache.offset :])
        started = time.perf_counter()

        def count(n: int) -> None:
            progress.read, progress.seconds = n, time.perf_counter() - started

        sent, y = 0, None
        token_answer = ((1,), mx.int32)

        def hand_on(chunk: Sequence[int], hidden: mx.array) -> None:
            nonlocal sent, y
            sent += len(chunk)
            last = sent == len(ids)
            position = cache.offset - len(chunk)
            y = self._step(mx.array([list(chunk)], mx.int32), hidden, position, slot,
                           IDS | (SAMPLE if last else 0), bits,
                           answer=token_answer if last else None)  # fmt: skip

        with self.transport(), mx.stream(generation_stream(self.model.plan)):
            try:
                if forward.read(ids, cache, stop, count, on_chunk=hand_on) is None:
                    return
                for n in range(1, max_tokens + 1):
                    token = int(self.link.wait(y).item())
                    if n < max_tokens:  # queue the next step before the caller sees this token
                        position = cache.offset
                        hidden = forward.hidden(mx.array([[token]], mx.int32), cache)
                        y = self._step(None, hidden, position, slot, SAMPLE, bits, token,
                                       answer=token_answer)  # fmt: skip
                    yield token, None
                    if n == max_tokens or stop():
                        return
            finally:
                self.rest()

    @contextmanager
    def transport(self) -> Iterator[None]:
        """A transport failure surfacing in any evaluation here: one line naming the rank."""
        from .distributed import transport_error

        try:
            yield
        except RuntimeError as e:
            if not transport_error(e):
                raise
            raise self.cluster.link_broken() from None

    def close(self) -> None:
        """Tell every rank to stop (at exit); quietly, when a rank is already lost."""
        if self._closed:
            return
        self._closed = True
        if self.cluster.lost is None and not self.cluster.closing:
            try:
                with self._speaking():
                    self.link.send_header(EXIT)
                mx.synchronize()
            except RuntimeError:
                pass
        self.cluster.close()

    def rest(self) -> None:
        """Rank 0 goes idle: the others wait for the bell, using no CPU (see liveness.py)."""
        if self.cluster.watch is None or self._resting or self._closed or self.cluster.lost:
            return
        if self._depth:  # a generator finished inside a unit (garbage collection): after it
            self._rest_pending = True
            return
        self._rest_pending = False
        self._send_json({"op": "rest"})
        self._resting = True

    # --- the wire ---------------------------------------------------------------------------

    # Each message, with the receive of its answer, is queued as one unit: a Ctrl+C between
    # its parts would leave the ranks out of step, so it is held until the unit is queued.

    @contextmanager
    def _speaking(self) -> Iterator[None]:
        """One unit on the wire: signals held, the bell rung first when the others rest."""
        with uninterrupted():
            if self._resting:
                self.cluster.watch.ring()
                self._resting = False
            self._depth += 1
            try:
                yield
            finally:
                self._depth -= 1
        if self._rest_pending and not self._depth:
            self.rest()

    def _send_json(self, message: dict) -> None:
        with self._speaking():
            self._send_freed()
            self.link.send_json(message)

    def _send_freed(self) -> None:
        """Slots of caches gone since the last message: the other ranks free theirs."""
        if self._freed:
            freed, self._freed = self._freed, []
            for slot in freed:
                self._held.pop(slot, None)
            self.link.send_json({"op": "free", "slots": freed})

    def _step(
        self,
        ids: mx.array | None,
        hidden: mx.array,
        position: int,
        slot: int,
        flags: int,
        bits: int,
        token: int = -1,
        answer: tuple[tuple[int, ...], mx.Dtype] | None = None,
    ) -> mx.array | None:
        """Queue a STEP and, when it has one, the receive of the last rank's answer."""
        with self._speaking():
            self._send_freed()
            length = hidden.shape[1]
            self.link.send_header(STEP, length, position, slot, flags, bits, token)
            if ids is not None:
                self.link.send(ids)
            self.link.send(hidden)
            if slot != NO_CACHE:
                self._held[slot] = position + length
            return self.link.recv(*answer) if answer is not None else None

    def _slot(self, cache: KVCache) -> int:
        slot = self._slots.get(cache)
        if slot is None:
            slot, self._next_slot = self._next_slot, self._next_slot + 1
            self._slots[cache] = slot
            weakref.finalize(cache, self._free, slot)
        return slot

    def _free(self, slot: int) -> None:
        self._freed.append(slot)  # sent with the next message, never from a finalizer
