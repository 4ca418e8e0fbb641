"""The model thread: one loaded model, the queue of turns, and every MLX call.

HTTP handlers never touch MLX. They hand a `Work` (how to build the `TurnRequest`, a stop
event, an asyncio queue) to `Scheduler.submit`; this thread starts the turns in order, decodes
up to `max_concurrent` of them together (continuous batching, `batch.BatchDecoder`), and posts
each event back to the handler's event loop. A handler whose client went away sets the stop
event: its answer ends at the next token and leaves the batch.

Clients resend the whole conversation each turn. The prompt caches (`PromptCaches`, nearest
token prefix wins) hold the previous turns' keys and values, the answer's included; for the
prompt to match them, an assistant message that is this server's own earlier answer is read
as the tokens it was generated as (`AnswerTokens`), not re-encoded from its text.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import queue
import sys
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from ..errors import ApertusError, UsageError
from .errors import ApiError

if TYPE_CHECKING:
    from ..batch import BatchDecoder
    from ..turn import TurnRequest, TurnService
    from .models import ModelNames


@dataclass(eq=False)
class Work:
    """One request's turn. `build(service)` makes its TurnRequest on the model thread (it may
    need the tokenizer); events come back on `queue` as (kind, value, logprobs) with kind
    "event", "error" (an ApiError) or "end"."""

    model: str  # the resolved model key (see `ModelNames.resolve`)
    build: Callable[[TurnService], TurnRequest]
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue = field(default_factory=asyncio.Queue)
    stop: threading.Event = field(default_factory=threading.Event)

    def post(self, kind: str, value: Any = None, logprobs: list | None = None) -> None:
        try:
            self.loop.call_soon_threadsafe(self.queue.put_nowait, (kind, value, logprobs))
        except RuntimeError:  # the event loop is closed: the server is gone
            self.stop.set()


@dataclass(eq=False)
class _Live:
    """An answer under way on the model thread."""

    work: Work
    service: TurnService
    request: TurnRequest
    turn: Any
    sent: int = 0  # log-probabilities already posted


class AnswerTokens:
    """This server's recent answers (text and calls) -> the token ids they were generated as."""

    def __init__(self, size: int = 512):
        self.size = size
        self._answers: OrderedDict[tuple, list[int]] = OrderedDict()

    @staticmethod
    def key(model: str, text: str | None, calls: list[tuple[str, str]]) -> tuple:
        return (model, text or "", tuple((name, _canonical(args)) for name, args in calls))

    def remember(self, key: tuple, tokens: list[int]) -> None:
        self._answers[key] = list(tokens)
        self._answers.move_to_end(key)
        while len(self._answers) > self.size:
            self._answers.popitem(last=False)

    def annotate(self, model: str, messages: list[dict]) -> list[dict]:
        """`messages` with `tokens` on each assistant message that is one of our answers."""
        from ..format.tools import content_text

        out = []
        for m in messages:
            if m.get("role") == "assistant" and "tokens" not in m:
                calls = [_call_parts(c) for c in m.get("tool_calls") or ()]
                text = m.get("content")
                text = content_text(text) if not isinstance(text, dict) else None
                tokens = None if text is None else self._answers.get(self.key(model, text, calls))
                if tokens:
                    m = {**m, "tokens": tokens}
            out.append(m)
        return out


def _call_parts(call: dict) -> tuple[str, str]:
    function = call.get("function", call)
    args = function.get("arguments", "")
    return str(function.get("name", "")), args if isinstance(args, str) else json.dumps(args)


def _canonical(arguments: str) -> str:
    try:
        return json.dumps(json.loads(arguments), sort_keys=True, separators=(",", ":"))
    except (ValueError, TypeError):
        return arguments


class Scheduler:
    """Runs turns on one thread that owns the model: up to `max_concurrent` answers decode
    together (`batch.BatchDecoder`: a new one joins at the next step, a finished one leaves),
    `max_queue` more wait; one more is a 429. Without batching, one answer at a time."""

    def __init__(
        self,
        names: ModelNames,
        *,
        max_concurrent: int = 8,
        max_queue: int = 32,
        cache_bytes: int | None = None,
        idle_unload_s: float | None = None,
        output_filter: Any = None,
        log: Callable[[str], None] | None = None,
        batching: bool = True,
        save: bool = False,
    ):
        self.names = names
        self.max_concurrent = max_concurrent
        self.limit = max_concurrent + max_queue
        self.batching = batching
        self.cache_bytes = cache_bytes
        self.idle_unload_s = idle_unload_s
        self.output_filter = output_filter
        self.log = log or (lambda line: print(line, file=sys.stderr, flush=True))
        self.answers = AnswerTokens()
        self.exchanges = None  # `--save`: chat exchanges kept in the history
        if save:
            from .history import ExchangeLog

            self.exchanges = ExchangeLog(self.log)
        self.service: TurnService | None = None
        self.loaded: str | None = None  # the model key of `service`
        self.decoder: BatchDecoder | None = None  # the answers decoding together
        self._live: list[_Live] = []
        self._held: Work | None = None  # a request for another model, until the others end
        self._closing = False
        self._queue: queue.Queue[Work | None] = queue.Queue()
        self._active: set[Work] = set()
        self._lock = threading.Lock()
        self._closed = False
        self._thread = threading.Thread(target=self._run, name="apertus-model", daemon=True)

    def start(self, preload: str | None = None) -> None:
        """Load `preload` now (errors reach the caller), then start the model thread."""
        if preload is not None:
            self._service_for(preload)
        self._thread.start()

    def submit(self, work: Work) -> None:
        with self._lock:
            if self._closed:
                raise ApiError(503, "the server is shutting down")
            if len(self._active) >= self.limit:
                raise ApiError(
                    429,
                    f"too many requests: {len(self._active)} are waiting or "
                    "running; try again shortly",
                )
            self._active.add(work)
        self._queue.put(work)

    @property
    def waiting(self) -> int:
        return len(self._active)

    def stop_all(self) -> None:
        """Cut every running and waiting answer (they end as interrupted); take no more."""
        with self._lock:
            self._closed = True
            for work in self._active:
                work.stop.set()
        self._queue.put(None)

    def join(self, timeout: float | None = None) -> None:
        if self._thread.is_alive():
            self._thread.join(timeout)

    # -- the model thread ----------------------------------------------------------------

    def _run(self) -> None:
        while self._take():
            for live in list(self._live):
                self._advance(live)
            if self.decoder is not None:
                self.decoder.step()  # every answer waiting for its next token, together
        if self.exchanges is not None:
            self.exchanges.close()  # on the thread that opened it, as sqlite3 wants

    def _take(self) -> bool:
        """Start waiting requests while there is room (a request for another model waits
        until the running answers end); block only when nothing runs. False: time to go."""
        while len(self._live) < self.max_concurrent and not self._closing:
            if self._held is not None:
                if self._live:
                    return True
                work, self._held = self._held, None
            else:
                try:
                    if self._live:
                        work = self._queue.get_nowait()
                    else:
                        idle = self.idle_unload_s if self.service else None
                        work = self._queue.get(timeout=idle)
                except queue.Empty:
                    if self._live:
                        return True
                    self._unload()  # idle for --idle-unload
                    continue
            if work is None:
                self._closing = True
            elif self._live and work.model != self.loaded:
                self._held = work
            else:
                self._start(work)
        return bool(self._live) or not self._closing

    def _start(self, work: Work) -> None:
        if work.stop.is_set():  # the client left while waiting
            self._finish(work)
            return
        try:
            service = self._service_for(work.model)
            request = work.build(service)
            if request.kind == "messages":
                messages = self.answers.annotate(work.model, request.messages or [])
                request = dataclasses.replace(request, messages=messages)
            steps = self.decoder.steps if self.decoder is not None else None
            turn = service.start(request, work.stop, steps=steps)
        except Exception as e:
            self._fail(work, e)
            self._finish(work)
            return
        self._live.append(_Live(work, service, request, turn))

    def _advance(self, live: _Live) -> None:
        """Run one answer until it waits for the batch's next step, or to its end."""
        work, turn = live.work, live.turn
        try:
            for event in turn.events:
                if getattr(event, "pending", False):
                    return
                new = turn.token_logprobs[live.sent :]
                live.sent = len(turn.token_logprobs)
                logprobs = self._logprobs(live.service, new) if new else None
                self._remember(live.service, work.model, live.request, event)
                self._save(live, event)  # saved by the time the client has the answer
                work.post("event", event, logprobs)
        except Exception as e:
            self._fail(work, e)
        self._live.remove(live)
        self._finish(work)

    def _fail(self, work: Work, e: Exception) -> None:
        if isinstance(e, ApiError):
            work.post("error", e)
        elif isinstance(e, ApertusError):
            work.post("error", ApiError(400 if isinstance(e, UsageError) else 500, str(e)))
        else:  # a bug of ours: one line, and the server keeps serving
            self.log(f"apertus-mlx: internal error: {type(e).__name__}: {e}")
            work.post("error", ApiError(500, "internal error: the answer failed"))

    def _finish(self, work: Work) -> None:
        with self._lock:
            self._active.discard(work)
        work.post("end")

    def _remember(self, service: TurnService, model: str, request: TurnRequest, event) -> None:
        """Keep an answer's tokens without the end token it may close with: the template
        writes its own end of turn after them (the same token for a real Apertus checkpoint,
        and the only one it accepts when the model ended with another end token)."""
        from ..generate import Done

        if isinstance(event, Done) and event.tokens and request.kind == "messages":
            tokens = list(event.tokens)
            if tokens[-1] in service.model.generation.eos_token_ids:
                tokens.pop()
            calls = [(c.name, c.arguments) for c in event.tool_calls]
            if tokens:
                self.answers.remember(AnswerTokens.key(model, event.text, calls), tokens)

    def _save(self, live: _Live, event) -> None:
        """`--save`: an ended chat exchange into the history."""
        from ..generate import Done

        if self.exchanges is None or live.request.kind != "messages":
            return
        if isinstance(event, Done):
            self.exchanges.save(live.service.model_id, live.request.messages or [], event)

    @staticmethod
    def _logprobs(service: TurnService, entries: list) -> list[dict]:
        """Token log-probabilities as the APIs give them (text and UTF-8 bytes)."""

        def entry(token: int, logprob: float) -> dict:
            text = service.tokenizer.decode([token])
            return {"token": text, "logprob": logprob, "bytes": list(text.encode("utf-8"))}

        return [
            {**entry(token, lp), "top_logprobs": [entry(t, v) for t, v in top or ()]}
            for token, lp, top in entries
        ]

    def _service_for(self, key: str) -> TurnService:
        if self.service is not None and self.loaded == key:
            return self.service
        from .. import load
        from ..prompt_caches import DEFAULT_BUDGET_BYTES, PromptCaches
        from ..turn import TurnService

        self._unload()
        started = time.perf_counter()
        path, model_id, revision = self.names.locate(key)
        model, tokenizer = load(path)
        budget = self.cache_bytes if self.cache_bytes is not None else DEFAULT_BUDGET_BYTES
        f = self.output_filter
        self.service = TurnService(
            model,
            tokenizer,
            model_id=model_id,
            revision=revision,
            output_filter=lambda: f,
            # Cut a cache only for the conversation it holds whole (a follow-up turn); any
            # other request sharing its opening reads a copy, so conversations running at
            # the same time all find the template's opening and the shared system prompt.
            caches=PromptCaches(budget, max_entries=64, min_share=1.0),
        )
        self.loaded = key
        # A model across hosts (pipeline ranks) decodes one answer at a time: each step
        # passes one token's hidden state from rank to rank.
        if self.batching and getattr(model, "pipeline", None) is None:
            from ..batch import BatchDecoder

            self.decoder = BatchDecoder(self.service.forward)
        self.log(f"loaded {model_id} in {time.perf_counter() - started:.1f} s")
        return self.service

    def _unload(self) -> None:
        if self.service is None:
            return
        import gc

        import mlx.core as mx

        name = self.service.model_id
        self.service, self.loaded, self.decoder = None, None, None
        gc.collect()
        mx.clear_cache()
        self.log(f"unloaded {name}")
