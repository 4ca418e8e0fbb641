"""Pipeline parallel: rank 0 drives a model whose layers are split across ranks.

Each rank holds one contiguous block of layers (`model.Part`) and only that block's KV cache.
Messages go round the ring of ranks with `mx.distributed.send`/`recv`: from rank r to r + 1,
and from the last rank back to rank 0, which is what MLX's ring backend allows (neighbours
only). Rank 0 speaks first and decides everything; the others (`servant.py`) only answer.

    header    int32[8]: op, length, position, slot, flags, kv bits, token, 0
    STEP      `length` tokens at cache `position` of cache `slot` (NO_CACHE: none): the ids
              (1, length) int32 when flagged IDS (a decode step's one token is in the header),
              then rank r's output (1, length, hidden) for rank r + 1. The last rank answers
              SAMPLE with the next token (int32, sampled with the slot's settings) and LOGITS
              with the logits (1, length, vocab) float32.
    CONTROL   `length` bytes of JSON follow: load a model, begin an answer (sampling settings
              for a slot), free slots, report what each rank holds.
    EXIT      every rank stops serving.

Every rank forwards header, ids and JSON to the next before working, so its neighbour can
prepare while it computes; prompt chunks therefore flow through the ranks one behind the other.
Each message is queued with its own evaluation, in protocol order: distributed operations run
on one stream per group, in the order they are queued, which keeps sends and receives paired.

Rank 0's KV caches are paired with the other ranks' by slot: a `KVCache` gets a slot the first
time it is used here, and when it is garbage-collected the slot is freed on every rank.
"""

from __future__ import annotations

import dataclasses
import gc
import json
import os
import signal
import threading
import time
import weakref
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import mlx.core as mx

from .device import generation_stream, model_bytes
from .errors import ApertusError, CheckpointError, UsageError

if TYPE_CHECKING:
    from .cache import KVCache
    from .distributed import Cluster
    from .generate import Forward, PromptProgress
    from .model import Model, Part
    from .sampling import SamplingParams

STEP, CONTROL, EXIT = 1, 2, 3
SAMPLE, LOGITS, IDS = 1, 2, 4
NO_CACHE = -1
HEADER = 8


@contextmanager
def uninterrupted() -> Iterator[None]:
    """Hold Ctrl+C and SIGTERM until the block is done, then deliver them."""
    if threading.current_thread() is not threading.main_thread():
        yield  # signals reach the main thread only
        return
    held: list[int] = []
    previous = {sig: signal.signal(sig, lambda s, _: held.append(s)) for sig in SIGNALS}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        for sig in held[:1]:
            handler = previous[sig]
            if callable(handler):
                handler(sig, None)  # Python's: KeyboardInterrupt (SIGTERM too, in the CLI)
            else:
                os.kill(os.getpid(), sig)  # the default action, or ignored, as before


SIGNALS = (signal.SIGINT, signal.SIGTERM)


class Link:
    """This rank's place in the ring: messages come from the previous rank, go to the next."""

    def __init__(self, cluster: Cluster):
        self.cluster = cluster
        self.group = cluster.group
        self.rank, self.size = cluster.rank, cluster.size
        self.previous, self.next = (self.rank - 1) % self.size, (self.rank + 1) % self.size
        self.last = self.rank == self.size - 1

    def send(self, x: mx.array) -> None:
        """Queue `x` to the next rank (the last rank's next is rank 0)."""
        mx.async_eval(mx.distributed.send(x, self.next, group=self.group))

    def recv(self, shape: tuple[int, ...], dtype: mx.Dtype) -> mx.array:
        """Queue a receive from the previous rank; evaluate it to wait for it."""
        out = mx.distributed.recv(shape, dtype, self.previous, group=self.group)
        mx.async_eval(out)
        return out

    def wait(self, x: mx.array) -> mx.array:
        """Evaluate `x`; a transport failure becomes one line naming the rank lost."""
        return self.cluster.call(lambda: x)

    def send_header(self, op: int, length: int = 0, position: int = 0, slot: int = NO_CACHE,
                    flags: int = 0, kv_bits: int = 0, token: int = -1) -> None:  # fmt: skip
        self.send(mx.array([op, length, position, slot, flags, kv_bits, token, 0], mx.int32))

    def send_json(self, message: dict) -> None:
        data = json.dumps(message).encode()
        self.send_header(CONTROL, len(data))
        self.send(mx.array(list(data), dtype=mx.uint8))


@dataclasses.dataclass
class Agreement:
    """What every rank agreed on at a load: who holds which layers, in what dtype."""

    parts: list[Part]
    dtype: str
    hosts: list[str]


def negotiate(
    cluster: Cluster, path: Path | None, dtype: str | None, split: list[int] | None,
    problem: ApertusError | None = None,
) -> Agreement | ApertusError:  # fmt: skip
    """Run on every rank at a load: exchange identities, refuse a mismatch, plan the split.

    Every rank sees every record and decides alike, so a refused load leaves all of them
    ready for the next message. Returns the agreement, or the error that refuses it (rank 0
    raises it; the others wait for what rank 0 does next).
    """
    from . import __version__
    from .placement import footprint, memory_bytes, plan_parts
    from .plan import compute_dtype

    record: dict[str, Any] = {"host": cluster.host, "version": f"{__version__}/{mx.__version__}"}
    fp = None
    if problem is None and path is not None:
        try:
            fp = footprint(path)
            on_gpu = mx.default_device() == mx.gpu and mx.metal.is_available()
            compute = compute_dtype(dtype, getattr(mx, fp.stored), on_gpu)
            record.update(checkpoint=fp.digest, dtype=str(compute).removeprefix("mlx.core."),
                          memory=memory_bytes())  # fmt: skip
        except ApertusError as e:
            problem = e
    if problem is not None:
        record.update(error=str(problem), code=problem.exit_code)
    records = cluster.exchange(record)
    cluster.hosts = [r["host"] for r in records]
    first = records[0]
    for rank, r in enumerate(records):
        where = cluster.host_of(rank)
        if r.get("error"):
            return _remote_error(f"{where}: {r['error']}", r.get("code", 1))
        if r["version"] != first["version"]:
            return _mismatch(
                f"{where} runs apertus-mlx/mlx {r['version']}, {cluster.host_of(0)} "
                f"{first['version']}: install the same version on every host"
            )
        if r["checkpoint"] != first["checkpoint"]:
            return _mismatch(
                f"{where} holds another checkpoint than {cluster.host_of(0)} "
                "(config.json or tensors differ): copy the same one to every host"
            )
        if r["dtype"] != first["dtype"]:
            return _mismatch(f"{where} would compute in {r['dtype']}, {cluster.host_of(0)} in "
                             f"{first['dtype']}: choose one with --dtype")  # fmt: skip
    try:
        parts = plan_parts(fp, [r["memory"] for r in records], split)
    except UsageError as e:
        return e
    return Agreement(parts, first["dtype"], cluster.hosts)


def _mismatch(message: str) -> ApertusError:
    from .distributed import ClusterMismatchError

    return ClusterMismatchError(message)


def _remote_error(message: str, code: int) -> ApertusError:
    error = CheckpointError(message) if code == 2 else ApertusError(message)
    return error


def ready(
    cluster: Cluster, model: Model | None, problem: ApertusError | None
) -> ApertusError | None:
    """After each rank loaded its part: everyone's outcome, the first failure as an error."""
    record = {"error": str(problem), "code": problem.exit_code} if problem else {}
    for rank, r in enumerate(cluster.exchange(record)):
        if r.get("error"):
            return _remote_error(f"{cluster.host_of(rank)}: {r['error']}", r.get("code", 1))
    return None


def describe(cluster: Cluster, model: Model | None) -> dict:
    """What this rank holds, for `Pipeline.ranks()`."""
    part = model.part if model is not None else None
    return {
        "rank": cluster.rank,
        "host": cluster.host,
        "layers": [part.start, part.stop] if part else None,
        "parameter_bytes": model_bytes(model) if model is not None else 0,
        "active_memory": mx.get_active_memory(),
        "peak_memory": mx.get_peak_memory(),
    }


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

        with self.transport(), mx.stream(generation_stream()):
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
