"""Ranks after the first: hold a part of the model, do what rank 0 says, print nothing.

A servant waits for rank 0's next message (see `pipeline.py` for the wire format), hands it
on to the next rank, and does its share: load its part of a model, run its layers over a
prompt chunk or a decoded token with the KV cache of the slot named, and, on the last rank,
sample the next token with the slot's settings (a seed gives the same tokens as on one
process: the same logits, the same key) or return the logits. It holds no prompt, writes no
history; its only output is a line on stderr when it fails itself.
"""

from __future__ import annotations

import gc
import json
import os
import sys

import mlx.core as mx

from .cache import KVCache
from .distributed import Cluster, RankLostError, transport_error
from .errors import ApertusError
from .handshake import Agreement, describe, negotiate, ready
from .wire import CONTROL, EXIT, HEADER, IDS, LOGITS, NO_CACHE, SAMPLE, STEP, Link


def serve(cluster: Cluster) -> int:
    """Serve rank 0 until it says EXIT (status 0) or is lost (status 1)."""
    servant = Servant(cluster)
    try:
        return servant.run()
    except RankLostError:
        return 1  # rank 0 says which host went
    except Exception as e:  # noqa: BLE001 - our own failure: one line, then the others learn
        if transport_error(e):  # surfaced by a later evaluation than the failed one
            cluster.link_broken()
            return 1
        if os.environ.get("APERTUS_MLX_DEBUG"):
            raise
        message = f"{type(e).__name__}: {e}" if not isinstance(e, ApertusError) else str(e)
        print(f"apertus-mlx: error: {cluster.host_of(cluster.rank)}: {message}", file=sys.stderr)
        return 1


class Servant:
    def __init__(self, cluster: Cluster):
        self.cluster = cluster
        self.link = Link(cluster)
        self.model = None
        self.forward = None
        self.caches: dict[int, KVCache] = {}
        self.history: dict[int, list[int]] = {}  # last rank: the ids each slot's cache holds
        self.samplers: dict[int, tuple] = {}  # last rank: (sampler, logits processors) per slot

    def run(self) -> int:
        link = self.link
        while True:
            header = link.wait(link.recv((HEADER,), mx.int32))
            if not link.last:
                link.send(header)
            op, length = header.tolist()[:2]
            if op == EXIT:
                return 0
            if op == CONTROL:
                data = link.wait(link.recv((length,), mx.uint8))
                if not link.last:
                    link.send(data)
                self.control(json.loads(bytes(data.tolist())))
            elif op == STEP:
                self.step(header.tolist())

    # --- control messages -----------------------------------------------------------------

    def control(self, message: dict) -> None:
        op = message["op"]
        if op == "load":
            self.load(message)
        elif op == "begin" and self.link.last:
            from .sampling import SamplingParams, make_logits_processors, make_sampler

            params = SamplingParams(**message["params"])
            self.samplers[message["slot"]] = (make_sampler(params), make_logits_processors(params))
        elif op == "free":
            for slot in message["slots"]:
                self.caches.pop(slot, None)
                self.history.pop(slot, None)
                self.samplers.pop(slot, None)
        elif op == "describe":
            self.cluster.exchange(describe(self.cluster, self.model))
        elif op == "rest" and self.cluster.watch is not None:
            self.cluster.watch.wait_bell()  # instead of a receive, which would spin

    def load(self, message: dict) -> None:
        from .generate import Forward
        from .hub import resolve_model
        from .loading import load_model

        self.model = self.forward = None
        self.caches.clear()
        self.history.clear()
        self.samplers.clear()
        gc.collect()  # the previous part goes before the next is read
        mx.reset_peak_memory()
        path, problem = None, None
        try:
            path = resolve_model(message["model"])
        except ApertusError as e:
            problem = e
        agreement = negotiate(self.cluster, path, message["dtype"], message["split"], problem)
        if not isinstance(agreement, Agreement):
            return  # refused on every rank; rank 0 says why
        model, problem = None, None
        try:
            part = agreement.parts[self.cluster.rank]
            model = load_model(path, dtype=agreement.dtype, fuse=message["fuse"], part=part)
        except ApertusError as e:
            problem = e
        except Exception as e:  # noqa: BLE001 - out of memory, say: rank 0 names it, in one line
            problem = ApertusError(f"{type(e).__name__}: {e}")
        if ready(self.cluster, model, problem) is None:
            self.model, self.forward = model, Forward(model)
            _keep_wired(model)

    # --- steps ------------------------------------------------------------------------------

    def step(self, header: list[int]) -> None:
        _, length, position, slot, flags, bits, token, _ = header
        link, model = self.link, self.model
        ids = None
        if flags & IDS:
            ids = link.recv((1, length), mx.int32)
            if not link.last:
                link.send(ids)
        x = link.recv((1, length, model.args.hidden_size), model.plan.dtype)
        cache = self._cache(slot, position, bits)
        if cache is None:
            out = model.model(x)
        elif length == 1:
            out = self.forward.hidden(x, cache)  # compiled, as decoding on one process
        else:
            out = cache.run(model.model, x)
        if not link.last:
            link.send(out)
            return
        fed = link.wait(ids).tolist()[0] if ids is not None else [token]
        history = self.history.setdefault(slot, [])
        del history[position:]
        history.extend(fed)
        if flags & LOGITS:
            link.send(model.logits(out).astype(mx.float32))
        if flags & SAMPLE:
            link.send(self.sample(slot, model.logits(out[:, -1, :])))

    def sample(self, slot: int, logits: mx.array) -> mx.array:
        """As `generate.generate_step` samples: processors, log-probabilities, the sampler."""
        sampler, processors = self.samplers[slot]
        logits = logits.astype(mx.float32)
        if processors:
            tokens = mx.array(self.history[slot], dtype=mx.int32)
            for processor in processors:
                logits = processor(tokens, logits)
        logprobs = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
        return sampler(logprobs).astype(mx.int32)

    def _cache(self, slot: int, position: int, bits: int) -> KVCache | None:
        """The slot's cache, holding exactly the `position` positions before this step."""
        if slot == NO_CACHE:
            return None
        cache = self.caches.get(slot)
        if cache is None:
            cache = self.caches[slot] = self.model.make_cache(bits=bits or None)
        if cache.offset < position:
            raise RuntimeError(
                f"rank 0 continues slot {slot} at position {position}, this rank holds "
                f"{cache.offset} (out of step)"
            )
        cache.truncate(position)
        return cache


def _keep_wired(model) -> None:
    """On a Mac, keep the part's weights in GPU memory for as long as this rank serves (rank 0
    does it per answer, `device.wired_limit`); this process does nothing else."""
    if model.plan.on_gpu:
        limit = mx.device_info().get("max_recommended_working_set_size")
        if limit:
            mx.set_wired_limit(limit)
