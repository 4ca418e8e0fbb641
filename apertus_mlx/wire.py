"""The messages between ranks: what goes round the ring, in what order.

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
              for a slot), free slots, report what each rank holds, rest until the bell.
    EXIT      every rank stops serving.

Every rank forwards header, ids and JSON to the next before working, so its neighbour can
prepare while it computes; prompt chunks therefore flow through the ranks one behind the other.
Each message is queued with its own evaluation, in protocol order: distributed operations run
on one stream per group, in the order they are queued, which keeps sends and receives paired.
"""

from __future__ import annotations

import json
import os
import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING

import mlx.core as mx

if TYPE_CHECKING:
    from .distributed import Cluster

STEP, CONTROL, EXIT = 1, 2, 3
SAMPLE, LOGITS, IDS = 1, 2, 4
NO_CACHE = -1
HEADER = 8
SIGNALS = (signal.SIGINT, signal.SIGTERM)  # held while a message is queued


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
