"""The model thread: one long-lived thread owns every MLX call, the UI only sends it jobs.

MLX streams belong to the thread that made them, so loading and generating must happen on the
same thread; a queue of jobs gives that, and keeps the UI responsive while the model works.
Results go back as Textual messages ("attributes down, messages up"); `post_message` is
thread-safe.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable
from dataclasses import dataclass

from textual.message import Message


@dataclass(frozen=True)
class ChatSettings:
    """What the user chose on the command line; None means the checkpoint's default."""

    system: str | None = None
    temperature: float | None = None
    top_p: float | None = None
    max_tokens: int | None = None


class ModelLoaded(Message):
    def __init__(self, name: str) -> None:
        super().__init__()
        self.name = name


class ModelFailed(Message):
    """The model could not be loaded: `error` is one line a user can act on."""

    def __init__(self, name: str, error: str) -> None:
        super().__init__()
        self.name = name
        self.error = error


class AnswerChunk(Message):
    def __init__(self, turn: int, text: str) -> None:
        super().__init__()
        self.turn = turn
        self.text = text


class AnswerDone(Message):
    """The answer ended; `stats` is apertus_mlx.generate.Stats, `error` set if it failed."""

    def __init__(self, turn: int, text: str, stats=None, error: str | None = None) -> None:
        super().__init__()
        self.turn = turn
        self.text = text
        self.stats = stats
        self.error = error


def describe_error(e: BaseException) -> str:
    """Our typed errors are already user-facing; anything else gets its type for a bug report."""
    from apertus_mlx.errors import ApertusError

    if isinstance(e, ApertusError):
        return str(e)
    return f"{type(e).__name__}: {e}" if str(e) else type(e).__name__


class ModelWorker:
    """Runs jobs on its own daemon thread; every public method is safe to call from the UI."""

    def __init__(self, post: Callable[[Message], object], settings: ChatSettings) -> None:
        self._post = post
        self.settings = settings
        self._jobs: queue.Queue[Callable[[], None] | None] = queue.Queue()
        self._stops: set[threading.Event] = set()  # one per queued or running answer
        self._lock = threading.Lock()
        self._parked = threading.Event()
        self._model = self._tokenizer = self._session = None
        self._thread = threading.Thread(target=self._run, name="apertus-mlx-model", daemon=True)
        self._thread.start()

    # --- called from the UI thread -------------------------------------------------------
    def load(self, name: str) -> None:
        self._jobs.put(lambda: self._load(name))

    def reply(self, turn: int, text: str) -> None:
        stop = threading.Event()  # its own event: a later stop() never races a newer answer
        with self._lock:
            self._stops.add(stop)
        self._jobs.put(lambda: self._reply(turn, text, stop))

    def stop(self) -> None:
        """Stop the answers queued or running; what was generated stays in the conversation."""
        with self._lock:
            for event in self._stops:
                event.set()

    def new_conversation(self) -> None:
        self.stop()
        self._jobs.put(self._new_session)

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
        self._model = self._tokenizer = self._session = None
        self._parked.set()
        threading.Event().wait()

    def _load(self, name: str) -> None:
        try:
            from apertus_mlx import load

            self._model, self._tokenizer = load(name)
            self._new_session()
        except Exception as e:  # noqa: BLE001 - shown in the UI, which stays usable
            self._model = self._tokenizer = self._session = None
            self._post(ModelFailed(name, describe_error(e)))
            return
        self._post(ModelLoaded(name))

    def _new_session(self) -> None:
        if self._model is None:
            return
        from apertus_mlx.generate import DEFAULT_MAX_TOKENS
        from apertus_mlx.sampling import SamplingParams
        from apertus_mlx.session import ChatSession

        s = self.settings
        params = SamplingParams.from_defaults(
            self._model.generation, temperature=s.temperature, top_p=s.top_p
        )
        self._session = ChatSession(self._model, self._tokenizer, system=s.system, params=params,
                                    max_tokens=s.max_tokens or DEFAULT_MAX_TOKENS)  # fmt: skip

    def _reply(self, turn: int, text: str, stop: threading.Event) -> None:
        try:
            self._stream(turn, text, stop)
        finally:
            with self._lock:
                self._stops.discard(stop)

    def _stream(self, turn: int, text: str, stop: threading.Event) -> None:
        from apertus_mlx.generate import Chunk, Done

        if self._session is None:
            self._post(AnswerDone(turn, "", error="no model is loaded"))
            return
        try:
            for event in self._session.reply(text, stop):
                if isinstance(event, Chunk):
                    if event.text:
                        self._post(AnswerChunk(turn, event.text))
                elif isinstance(event, Done):
                    self._post(AnswerDone(turn, event.text, event.stats))
                else:  # session.Error
                    self._post(AnswerDone(turn, "", error=event.message))
        except Exception as e:  # noqa: BLE001 - the thread must survive for the next turn
            self._post(AnswerDone(turn, "", error=describe_error(e)))
