"""The model thread: one long-lived thread owns every MLX call; the UI only hands it turns.

MLX streams belong to the thread that made them, so loading and generating must happen on the
same thread; a queue of jobs gives that, and keeps the UI responsive while the model works.
The conversation logic is the engine's turn service (`apertus_mlx.turn`): this module only
carries its requests over and its events back, as Textual messages ("attributes down,
messages up"; `post_message` is thread-safe). Every message says which job it belongs to, so
the UI may show another conversation meanwhile without losing or mixing an answer.
"""

from __future__ import annotations

import itertools
import queue
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from textual.message import Message

if TYPE_CHECKING:
    from apertus_mlx.turn import TurnRequest, TurnService


BATCH_S = 0.025  # the answer's text reaches the UI at most 40 times a second


class ModelLoading(Message):
    def __init__(self, name: str) -> None:
        super().__init__()
        self.name = name


class ModelLoaded(Message):
    """The model is ready; `context` is its window in tokens, `revision` its snapshot hash."""

    def __init__(self, name: str, context: int, revision: str | None) -> None:
        super().__init__()
        self.name = name
        self.context = context
        self.revision = revision


class ModelFailed(Message):
    """The model could not be loaded: `error` is one line a user can act on."""

    def __init__(self, name: str, error: str) -> None:
        super().__init__()
        self.name = name
        self.error = error


class TurnMessage(Message):
    """Something about job `job` (the number `ModelWorker.turn` returned)."""

    def __init__(self, job: int) -> None:
        super().__init__()
        self.job = job


class TurnStarted(TurnMessage):
    """The user's message and the answer's row are in the store; `dropped` oldest messages
    were left out so the prompt fits the model's window."""

    def __init__(self, job: int, conversation_id: str, user_message_id: int | None,
                 message_id: int | None, dropped: int) -> None:  # fmt: skip
        super().__init__(job)
        self.conversation_id = conversation_id
        self.user_message_id = user_message_id
        self.message_id = message_id
        self.dropped = dropped


class TurnRefused(TurnMessage):
    """Nothing was written: the input was refused before the turn started (too long...)."""

    def __init__(self, job: int, error: str) -> None:
        super().__init__(job)
        self.error = error


class AnswerChunk(TurnMessage):
    """More of the answer's text: `tokens` chunks of the turn, sent together (see `Batch`)."""

    def __init__(self, job: int, text: str, tokens: int = 1) -> None:
        super().__init__(job)
        self.text = text
        self.tokens = tokens


class AnswerThought(TurnMessage):
    """Deliberation text of the answer (it comes before the answer's own text)."""

    def __init__(self, job: int, text: str) -> None:
        super().__init__(job)
        self.text = text


class TurnNote(TurnMessage):
    """One line the user should hear (a saved cache was damaged, the chat was deleted...)."""

    def __init__(self, job: int, text: str) -> None:
        super().__init__(job)
        self.text = text


class AnswerDone(TurnMessage):
    """The answer ended; `stats` is apertus_mlx.generate.Stats (None on error), `error` one
    line, `context_used` the tokens the conversation now fills, `store_error` a failed save,
    `deleted` whether its conversation was deleted meanwhile."""

    def __init__(
        self,
        job: int,
        text: str = "",
        stats=None,
        error: str | None = None,
        context_used: int = 0,
        store_error: str | None = None,
        deleted: bool = False,
    ) -> None:
        super().__init__(job)
        self.text = text
        self.stats = stats
        self.error = error
        self.context_used = context_used
        self.store_error = store_error
        self.deleted = deleted


class Batch:
    """The answer's text (or thoughts) posted at most every `interval` seconds: a fast model
    makes hundreds of chunks a second, and each message costs the event loop a wake-up and a
    handler while it also lays out the answer (benchmarks/ui_stall.py). A chunk that comes
    `interval` after the last post goes out at once, so a model slower than that streams
    token by token; what is held back goes out with the next chunk or `flush`."""

    def __init__(self, post: Callable[[Message], object], job: int, interval: float) -> None:
        self._post, self._job, self._interval = post, job, interval
        self._kind: type[AnswerChunk] | type[AnswerThought] | None = None
        self._text, self._count, self._posted = "", 0, -float("inf")  # the first goes at once

    def add(self, kind: type[AnswerChunk] | type[AnswerThought], text: str) -> None:
        if kind is not self._kind:
            self.flush()
            self._kind = kind
        self._text += text
        self._count += 1
        if time.monotonic() - self._posted >= self._interval:
            self.flush()

    def flush(self) -> None:
        """Post what is held back (before any other message of the turn)."""
        if not self._text:
            return
        if self._kind is AnswerChunk:
            self._post(AnswerChunk(self._job, self._text, self._count))
        else:
            self._post(AnswerThought(self._job, self._text))
        self._text, self._count, self._posted = "", 0, time.monotonic()


def describe_error(e: BaseException) -> str:
    """Our typed errors are already user-facing; anything else gets its type for a bug report."""
    from apertus_mlx.errors import ApertusError

    if isinstance(e, ApertusError):
        return str(e)
    return f"{type(e).__name__}: {e}" if str(e) else type(e).__name__


class ModelWorker:
    """Runs jobs on its own daemon thread; every public method is safe to call from the UI."""

    def __init__(self, post: Callable[[Message], object], store) -> None:
        self._post = post
        self._store = store
        self._jobs: queue.Queue[Callable[[], None] | None] = queue.Queue()
        self._stops: dict[int, threading.Event] = {}  # one per queued or running turn
        self._numbers = itertools.count(1)
        self._lock = threading.Lock()
        self._parked = threading.Event()
        self._service: TurnService | None = None
        self._name: str | None = None
        self._thread = threading.Thread(target=self._run, name="apertus-mlx-model", daemon=True)
        self._thread.start()

    # --- called from the UI thread -------------------------------------------------------
    def load(self, name: str) -> None:
        self._jobs.put(lambda: self._ensure_model(name))

    def turn(self, request: TurnRequest, model: str) -> int:
        """Queue a turn with `model`; returns its job number, which its messages carry."""
        job = next(self._numbers)
        stop = threading.Event()  # its own: a later stop() never races a newer answer
        with self._lock:
            self._stops[job] = stop
        self._jobs.put(lambda: self._turn(job, request, model, stop))
        return job

    def stop(self) -> None:
        """Stop the turns queued or running; what was generated stays, marked interrupted."""
        with self._lock:
            for event in self._stops.values():
                event.set()

    def delete(self, conversation_id: str) -> None:
        """Delete a conversation for good (rows, search entries, saved cache and the cache in
        memory), even while its answer streams: that turn notices and saves nothing.
        StoreError if the store refuses."""
        from apertus_mlx.saved_caches import delete_conversation

        service = self._service
        if service is not None:
            service.delete(conversation_id)
        else:
            delete_conversation(self._store, conversation_id)

    def shutdown(self, timeout: float = 5.0) -> None:
        """Stop the answer and let the thread finish its job; it then parks (see `_run`)."""
        self.stop()
        self._jobs.put(None)
        self._parked.wait(timeout)

    # --- on the model thread -------------------------------------------------------------
    def _run(self) -> None:
        while (job := self._jobs.get()) is not None:
            job()
        # Park instead of returning: with mlx 0.32 a thread that ran MLX work and then ends
        # often makes the process abort at exit ("terminate called without an active
        # exception"); a parked daemon thread does not.
        self._service = None
        self._parked.set()
        threading.Event().wait()

    def _ensure_model(self, name: str) -> bool:
        if name == self._name and self._service is not None:
            return True
        self._post(ModelLoading(name))
        try:
            from apertus_mlx import load
            from apertus_mlx.hub import model_identity
            from apertus_mlx.output_filter import InstalledFilter
            from apertus_mlx.saved_caches import SavedCaches
            from apertus_mlx.turn import TurnService

            self._service, self._name = None, None
            model, tokenizer = load(name)
            try:
                model_id, revision = model_identity(name)
            except Exception:  # noqa: BLE001 - the revision is a detail; the model runs
                model_id, revision = name, None
            in_memory = str(self._store.path) == ":memory:"  # the session is not kept
            self._service = TurnService(
                model,
                tokenizer,
                model_id=model_id,
                revision=revision,
                store=self._store,
                saved=None if in_memory else SavedCaches(),
                output_filter=InstalledFilter(),
            )
        except Exception as e:  # noqa: BLE001 - shown in the UI, which stays usable
            self._service = None
            self._post(ModelFailed(name, describe_error(e)))
            return False
        self._name = name
        window = model.args.max_position_embeddings
        self._post(ModelLoaded(name, window, revision))
        return True

    def _turn(self, job: int, request: TurnRequest, model: str, stop: threading.Event) -> None:
        try:
            if stop.is_set():  # stopped while it waited for the model thread
                self._post(TurnRefused(job, "stopped before it started"))
            elif not self._ensure_model(model):
                self._post(TurnRefused(job, "no model is loaded"))
            else:
                self._answer(job, request, stop)
        finally:
            with self._lock:
                self._stops.pop(job, None)

    def _answer(self, job: int, request: TurnRequest, stop: threading.Event) -> None:
        from apertus_mlx.format import Chunk, Thought
        from apertus_mlx.generate import Done
        from apertus_mlx.turn import Note, Started

        turn = self._service.start(request, stop)
        started = False
        text, stats, error = "", None, None
        batch = Batch(self._post, job, BATCH_S)
        try:
            for event in turn.events:
                if isinstance(event, Chunk):
                    if event.text:
                        text += event.text
                        batch.add(AnswerChunk, event.text)
                elif isinstance(event, Thought):
                    if event.text:
                        batch.add(AnswerThought, event.text)
                elif isinstance(event, Done):
                    stats = event.stats
                elif isinstance(event, Note):
                    batch.flush()
                    self._post(TurnNote(job, event.text))
                elif isinstance(event, Started):
                    started = True
                    self._post(TurnStarted(job, event.conversation_id, event.user_message_id,
                                           event.answer_message_id, event.dropped))  # fmt: skip
        except Exception as e:  # noqa: BLE001 - the thread must survive for the next turn
            if not started:  # refused before anything was written
                self._post(TurnRefused(job, describe_error(e)))
                return
            error = describe_error(e)
        batch.flush()
        used = stats.prompt_tokens + stats.generated_tokens if stats is not None else 0
        store_error = str(turn.store_error) if turn.store_error else None
        self._post(AnswerDone(job, text, stats, error, used, store_error, turn.deleted))
