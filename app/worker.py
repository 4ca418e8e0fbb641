"""The model thread: one long-lived thread owns every MLX call, the UI only sends it jobs.

MLX streams belong to the thread that made them, so loading and generating must happen on the
same thread; a queue of jobs gives that, and keeps the UI responsive while the model works.
Results go back as Textual messages ("attributes down, messages up"); `post_message` is
thread-safe. Every answer streams into the history store as it is generated, tagged with its
conversation, so the UI may show another conversation meanwhile without losing or mixing it.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass

from textual.message import Message

from .settings import ChatSettings


@dataclass(frozen=True)
class Reply:
    """One answer to make: the conversation as the model should read it, ending with the
    user message `parent_id` that the answer replies to."""

    conversation_id: str
    parent_id: int
    history: list[dict]
    model: str
    settings: ChatSettings


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


class AnswerStarted(Message):
    """The answer's row exists in the store (`message_id`); `dropped` counts the oldest
    messages left out so the prompt fits the model's window (0 if none)."""

    def __init__(self, conversation_id: str, message_id: int, dropped: int) -> None:
        super().__init__()
        self.conversation_id = conversation_id
        self.message_id = message_id
        self.dropped = dropped


class AnswerChunk(Message):
    def __init__(self, conversation_id: str, message_id: int, text: str) -> None:
        super().__init__()
        self.conversation_id = conversation_id
        self.message_id = message_id
        self.text = text


class AnswerDone(Message):
    """The answer ended; `stats` is apertus_mlx.generate.Stats (None on error), `error` one
    line, `context_used` the tokens the conversation now fills, `store_error` a failed save."""

    def __init__(
        self,
        conversation_id: str,
        message_id: int | None,
        text: str,
        stats=None,
        error: str | None = None,
        context_used: int = 0,
        store_error: str | None = None,
    ) -> None:
        super().__init__()
        self.conversation_id = conversation_id
        self.message_id = message_id
        self.text = text
        self.stats = stats
        self.error = error
        self.context_used = context_used
        self.store_error = store_error


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
        self._stops: set[threading.Event] = set()  # one per queued or running answer
        self._lock = threading.Lock()
        self._parked = threading.Event()
        self._model = self._tokenizer = self._session = None
        self._name: str | None = None
        self._revision: str | None = None
        self._filter = None  # (file mtime, OutputFilter) of the installed filter
        self._thread = threading.Thread(target=self._run, name="apertus-mlx-model", daemon=True)
        self._thread.start()

    # --- called from the UI thread -------------------------------------------------------
    def load(self, name: str) -> None:
        self._jobs.put(lambda: self._ensure_model(name))

    def reply(self, job: Reply) -> None:
        stop = threading.Event()  # its own event: a later stop() never races a newer answer
        with self._lock:
            self._stops.add(stop)
        self._jobs.put(lambda: self._reply(job, stop))

    def stop(self) -> None:
        """Stop the answers queued or running; what was generated stays, marked interrupted."""
        with self._lock:
            for event in self._stops:
                event.set()

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

    def _ensure_model(self, name: str) -> bool:
        if name == self._name and self._model is not None:
            return True
        self._post(ModelLoading(name))
        try:
            from apertus_mlx import load
            from apertus_mlx.recording import model_identity
            from apertus_mlx.saved_caches import SavedCaches, identity
            from apertus_mlx.session import ChatSession

            self._model = self._tokenizer = self._session = None
            self._name = None
            self._model, self._tokenizer = load(name)
            try:
                model_id, self._revision = model_identity(name)
            except Exception:  # noqa: BLE001 - the revision is a detail; the model runs
                model_id, self._revision = name, None
            self._session = ChatSession(
                self._model,
                self._tokenizer,
                saved=SavedCaches(),
                identity=identity(self._model, model_id, self._revision),
            )
        except Exception as e:  # noqa: BLE001 - shown in the UI, which stays usable
            self._model = self._tokenizer = self._session = None
            self._post(ModelFailed(name, describe_error(e)))
            return False
        self._name = name
        self._post(ModelLoaded(name, self._model.args.max_position_embeddings, self._revision))
        return True

    def _reply(self, job: Reply, stop: threading.Event) -> None:
        try:
            if stop.is_set():  # stopped while it waited for the model thread
                self._post(
                    AnswerDone(job.conversation_id, None, "", error="stopped before it started")
                )
                return
            if not self._ensure_model(job.model):
                self._post(AnswerDone(job.conversation_id, None, "", error="no model is loaded"))
                return
            self._answer(job, stop)
        except Exception as e:  # noqa: BLE001 - the thread must survive for the next turn
            self._post(AnswerDone(job.conversation_id, None, "", error=describe_error(e)))
        finally:
            with self._lock:
                self._stops.discard(stop)

    def _answer(self, job: Reply, stop: threading.Event) -> None:
        from apertus_mlx.generate import DEFAULT_MAX_TOKENS, Chunk, Done
        from apertus_mlx.prompt import fit_window
        from apertus_mlx.sampling import SamplingParams

        s, session = job.settings, self._session
        session.params = SamplingParams.from_defaults(self._model.generation, **s.sampling())
        session.enable_thinking = s.thinking
        session.max_tokens = s.max_tokens or DEFAULT_MAX_TOKENS
        window = self._model.args.max_position_embeddings
        reserve = min(session.max_tokens, window // 4)
        history, dropped = fit_window(
            job.history, lambda m: len(session.prompt_ids(m)), window, reserve
        )
        recorded = {**s.as_dict(), **asdict(session.params), "max_tokens": session.max_tokens}
        recorded |= {"model": self._name, "revision": self._revision}
        writer = self._store.start_answer(
            job.conversation_id, job.parent_id, settings=recorded, seed=s.seed
        )
        cid, mid = job.conversation_id, writer.message_id
        self._post(AnswerStarted(cid, mid, dropped))
        text, stats, error, tokens = "", None, None, None
        try:
            events = self._filtered(session.answer(history, stop, conversation_id=cid))
        except Exception as e:  # noqa: BLE001 - a damaged filter: refuse to answer unfiltered
            events, error = iter(()), describe_error(e)
        for event in events:
            if isinstance(event, Chunk):
                # token ids only with the final text: a filtered chunk's id could decode
                # to what the filter removed
                writer.append(event.text)
                if event.text:
                    text += event.text
                    self._post(AnswerChunk(cid, mid, event.text))
            elif isinstance(event, Done):
                stats, tokens = event.stats, event.tokens
            else:  # session.Error
                error = event.message
        if stats is not None:
            store_error = writer.finish(stats.finish_reason, stats, tokens)
            used = stats.prompt_tokens + stats.generated_tokens
        else:
            store_error = writer.finish("error")
            used = 0
        self._post(AnswerDone(cid, mid, text, stats, error, used,
                              str(store_error) if store_error else None))  # fmt: skip
        # After the answer is shown: the next turn of this conversation, even after a
        # restart, reads only what is new. Not the answer's part if the filter removed any.
        session.persist(answer_kept=bool(tokens))

    def _filtered(self, events: Iterator) -> Iterator:
        """The events through the installed output filter (personal data removed) before
        they reach the screen or the store; unchanged when none is installed. A filter file
        that cannot be read raises FilterInstallError: no answer goes out unfiltered."""
        from apertus_mlx.errors import FilterFormatError, FilterInstallError
        from apertus_mlx.output_filter import OutputFilter, filtered, installed_path

        path = installed_path()
        try:
            stamp = path.stat().st_mtime_ns
        except OSError:
            return events
        if self._filter is None or self._filter[0] != stamp:  # read again once replaced
            try:
                self._filter = (stamp, OutputFilter.from_file(path))
            except FilterFormatError as e:
                raise FilterInstallError(
                    f"{e} (fix it with `apertus-mlx filter install FILE` or `filter rm`)"
                ) from None
        return filtered(events, self._filter[1])
