"""One conversation turn, written once for every front end (`generate`, the chat, the server).

A turn goes: the branch from the store -> the settings -> the token-exact prompt, fitted to the
context window -> the user's message and the answer's row in the store -> a KV cache (in
memory, else saved on disk, else new) -> generation (with a draft model or without) -> the
output filter -> the answer, streamed into the store -> the cache, kept in memory and saved
on disk while the conversation still exists.

Nothing is written for an input that is refused (a message longer than the context), and a
turn attaches to the message it read: two turns on one conversation at once become sibling
branches, never an answer filed under the other's question. A conversation deleted while its
answer streams (here or in another process) stays deleted: the answer is shown, not saved, and
a `Note` says so.

    service = TurnService(model, tokenizer, model_id="swiss-ai/...", store=Store.open())
    turn = service.start(TurnRequest.follow(cid, "Und jetzt?"))
    for event in turn.events:   # Started, Chunk..., Done, Note...
        ...
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

from .errors import ApertusError, StoreError, UsageError
from .forward import DEFAULT_MAX_TOKENS, Forward
from .generate import Chunk, Done, generate
from .prompt import ConversationIds, conversation_ids, fit_window
from .prompt_caches import PromptCaches
from .settings import TurnSettings

if TYPE_CHECKING:
    from .cache import KVCache
    from .output_filter import OutputFilter
    from .saved_caches import SavedCaches
    from .speculative import Draft
    from .store import AnswerWriter, Conversation, Store


@dataclass(frozen=True)
class TurnRequest:
    """What to answer. Build one with the class methods."""

    kind: Literal["new", "follow", "again", "messages", "raw"]
    text: str | None = None  # the user's new message
    conversation_id: str | None = None
    parent: int | None | Literal["leaf"] = "leaf"  # the message `text` follows, or answers again
    settings: TurnSettings | None = None  # new, messages, raw: the settings
    overrides: dict[str, Any] = field(default_factory=dict)  # follow, again: over the stored ones
    messages: list[dict] | None = None
    prompt_ids: list[int] | None = None
    best_effort_store: bool = False  # answer even if the store cannot be written (say so after)

    @classmethod
    def new(cls, text: str, settings: TurnSettings, **kw: Any) -> TurnRequest:
        """The first message of a new stored conversation."""
        return cls("new", text=text, settings=settings, **kw)

    @classmethod
    def follow(
        cls,
        conversation_id: str,
        text: str,
        parent: int | None | Literal["leaf"] = "leaf",
        **kw: Any,
    ) -> TurnRequest:
        """A new message in a stored conversation, after `parent` (its current leaf, or an
        earlier message: an edit branches there); `overrides` change its settings."""
        return cls("follow", text=text, conversation_id=conversation_id, parent=parent, **kw)

    @classmethod
    def again(cls, conversation_id: str, user_message_id: int, **kw: Any) -> TurnRequest:
        """Another answer to a stored user message (regenerate): a sibling branch."""
        return cls("again", conversation_id=conversation_id, parent=user_message_id, **kw)

    @classmethod
    def chat(cls, messages: list[dict], settings: TurnSettings) -> TurnRequest:
        """A conversation the caller carries (system/user/assistant messages; assistant ones
        may carry the `tokens` they were generated as): nothing is stored."""
        return cls("messages", messages=messages, settings=settings)

    @classmethod
    def raw(cls, prompt_ids: list[int], settings: TurnSettings) -> TurnRequest:
        """A plain completion of `prompt_ids`, no chat template."""
        return cls("raw", prompt_ids=prompt_ids, settings=settings)


@dataclass
class Started:
    """The turn is under way: its rows exist (ids None when nothing is stored), `dropped`
    oldest messages were left out so the prompt fits the model's window."""

    conversation_id: str | None
    user_message_id: int | None
    answer_message_id: int | None
    dropped: int
    prompt_tokens: int


@dataclass
class Note:
    """Something the user should hear about this turn, in one line (not an error)."""

    text: str


Event = Started | Chunk | Done | Note


class TurnService:
    """One loaded model's turns: its compiled forward pass, the KV caches it keeps between
    turns, the store and the output filter. Every MLX call of a turn runs on the thread that
    iterates `Turn.events`; run one turn at a time per service."""

    def __init__(
        self,
        model,
        tokenizer,
        *,
        model_id: str,
        revision: str | None = None,
        store: Store | None = None,
        saved: SavedCaches | None = None,
        output_filter: Callable[[], OutputFilter | None] | None = None,
        draft: Draft | None = None,
        kv_bits: int | None = None,
        caches: PromptCaches | None = None,
    ):
        self.model, self.tokenizer = model, tokenizer
        self.model_id, self.revision = model_id, revision
        self.store, self.saved = store, saved
        self.output_filter = output_filter or (lambda: None)
        self.draft = draft
        self.kv_bits = kv_bits
        self.caches = caches if caches is not None else PromptCaches()
        self.forward = Forward(model)  # its compiled graphs serve every turn
        self.window = model.args.max_position_embeddings
        model.make_cache(bits=kv_bits)  # refuses a layout this model cannot have, now

    def start(self, request: TurnRequest, stop: threading.Event | None = None) -> Turn:
        return Turn(self, request, stop)

    def delete(self, conversation_id: str) -> Conversation:
        """Delete a stored conversation for good (rows, search entries, saved cache) and the
        cache this service keeps of it in memory."""
        from .saved_caches import delete_conversation

        self.caches.forget(conversation_id)
        return delete_conversation(self.store, conversation_id, self.saved)

    def prompt(self, messages: list[dict], settings: TurnSettings) -> tuple[ConversationIds, int]:
        """The token-exact prompt of `messages`, its oldest turns left out where it would not
        leave the answer its reserve of the window; (prompt, how many messages were left out).
        UsageError when even the last message alone does not fit."""
        built: dict[int, ConversationIds] = {}

        def count(kept: list[dict]) -> int:
            built[len(kept)] = conversation_ids(
                self.tokenizer, kept, enable_thinking=settings.thinking
            )
            return len(built[len(kept)].ids)

        kept, dropped = fit_window(messages, count, self.window, self.reserve(settings))
        prompt = built.get(len(kept)) or conversation_ids(
            self.tokenizer, kept, enable_thinking=settings.thinking
        )
        self.check_fits(len(prompt.ids))
        return prompt, dropped

    def reserve(self, settings: TurnSettings) -> int:
        """Tokens of the window kept free for the answer when old turns must go."""
        return min(settings.max_tokens or DEFAULT_MAX_TOKENS, self.window // 4)

    def check_fits(self, prompt_tokens: int) -> None:
        if prompt_tokens >= self.window:
            raise UsageError(
                f"the message is too long: the prompt has {prompt_tokens} tokens and the "
                f"model's context is {self.window} (nothing was saved)"
            )

    def identity(self) -> dict[str, str]:
        from .saved_caches import identity

        return identity(self.model, self.model_id, self.revision, self.kv_bits)


class Turn:
    """One turn under way: iterate `events`; afterwards the attributes say what was stored."""

    def __init__(self, service: TurnService, request: TurnRequest, stop: threading.Event | None):
        self.service, self.request, self.stop = service, request, stop
        self.conversation_id: str | None = request.conversation_id
        self.answer_message_id: int | None = None
        self.store_error: StoreError | None = None  # the answer is not (all) in the history
        self.deleted = False  # the conversation was deleted while this turn ran
        self.prompt: ConversationIds | None = None
        self.settings: TurnSettings | None = None  # as resolved for this turn
        self.max_tokens = DEFAULT_MAX_TOKENS  # the answer's limit
        self.events: Iterator[Event] = self._run()

    # -- the turn, in order ------------------------------------------------------------------

    def _run(self) -> Iterator[Event]:
        s, r = self.service, self.request
        store = s.store if r.kind in ("new", "follow", "again") else None
        if store is None and r.kind in ("new", "follow", "again"):
            raise UsageError("this turn needs the history store")
        conversation, path = self._read(store)
        settings = self.settings = self._settings(conversation)
        messages = self._messages(conversation, settings, path)
        if r.kind == "raw":
            ids = [int(i) for i in r.prompt_ids or ()]
            s.check_fits(len(ids))
            self.prompt, dropped = ConversationIds(ids, True), 0
        else:
            self.prompt, dropped = s.prompt(messages, settings)
        params = settings.params(s.model.generation)  # refused here, before anything is written
        f = s.output_filter()  # a damaged filter too: no answer goes out unfiltered
        limit = self.max_tokens = settings.max_tokens or DEFAULT_MAX_TOKENS
        record = settings.record(params, limit, s.model_id, s.revision)
        writer, user_id = None, None
        if store is not None:
            writer, user_id = self._write_start(store, conversation, path, settings, record)
        yield Started(self.conversation_id, user_id, self.answer_message_id, dropped,
                      len(self.prompt.ids))  # fmt: skip
        key = self.conversation_id if writer is not None else None
        cache, note = self._cache(key)
        if note:
            yield Note(note)
        yield from self._generate(settings, params, limit, cache, writer, f)
        yield from self._keep(cache, key, writer)

    def _read(self, store: Store | None) -> tuple[Conversation | None, list]:
        """The conversation and the branch this turn follows (root first)."""
        r = self.request
        if r.kind not in ("follow", "again"):
            return None, []
        conversation = store.get_conversation(r.conversation_id)
        self.conversation_id = conversation.id
        parent = conversation.current_leaf if r.parent == "leaf" else r.parent
        path = store.path_to(parent) if parent is not None else []
        if parent is not None and (not path or path[0].conversation_id != conversation.id):
            raise UsageError(f"message {parent} is not in conversation {conversation.id}")
        if r.parent == "leaf" and path and path[-1].streaming():
            # Another turn is answering the leaf's question right now: this one branches
            # beside that question rather than after an answer that is not there yet.
            path = path[:-2]
        if r.kind == "again" and (not path or path[-1].role != "user"):
            raise UsageError("only a user message can be answered again")
        return conversation, path

    def _settings(self, conversation: Conversation | None) -> TurnSettings:
        r = self.request
        if conversation is None:
            return r.settings or TurnSettings()
        try:
            stored = TurnSettings.of(conversation)
        except (UsageError, TypeError):  # written by another tool or version: not usable
            stored = TurnSettings(system=conversation.system, thinking=conversation.thinking)
        return stored.merged(**r.overrides)

    def _messages(self, conversation, settings: TurnSettings, path: list) -> list[dict]:
        r = self.request
        if r.kind == "messages":
            return [dict(m) for m in r.messages or ()]
        messages = [{"role": "system", "content": settings.system}] if settings.system else []
        messages += [
            {"role": m.role, "content": m.content, "tokens": m.tokens}
            for m in path
            if m.role in ("user", "assistant")
        ]
        if r.text is not None:
            messages.append({"role": "user", "content": r.text})
        return messages

    def _write_start(
        self, store: Store, conversation, path: list, settings: TurnSettings, record: dict
    ) -> tuple[AnswerWriter | None, int | None]:
        """The user's message after the message this turn read, and the answer's empty row
        after it; (None, None) when the store refuses and the request answers anyway."""
        s, r = self.service, self.request
        fields = dict(
            model=s.model_id,
            revision=s.revision,
            system=settings.system,
            thinking=settings.thinking,
            settings=settings.stored(),
        )
        try:
            if conversation is None:
                conversation = store.create_conversation(**fields)
                self.conversation_id = conversation.id
            elif any(getattr(conversation, k) != v for k, v in fields.items()):
                store.update_conversation(conversation.id, **fields)
            parent = path[-1].id if path else None
            user_id = parent  # answering again: the user message is already there
            if r.text is not None:
                user_id = store.add_message(conversation.id, "user", r.text, parent).id
            writer = store.start_answer(
                conversation.id, user_id, settings=record, seed=settings.seed
            )
        except StoreError as e:
            if not r.best_effort_store:
                raise
            self.store_error = e
            return None, None
        self.answer_message_id = writer.message_id
        return writer, user_id

    def _cache(self, key: str | None) -> tuple[KVCache, str | None]:
        """The KV cache to continue: this conversation's from memory, else from disk, else a
        new one; and a note when a saved one could not be used."""
        s = self.service
        like = s.model.make_cache(bits=s.kv_bits)
        cache = s.caches.take(self.prompt.ids, like, key)
        note = None
        if cache is None and key is not None and s.saved is not None:
            loaded = s.saved.load(key, like, s.identity())
            if loaded.note:
                note = f"{loaded.note}; this answer reads the whole conversation"
            if loaded.cache is not None:
                cache = loaded.cache
                cache.keep_prefix(self.prompt.ids)
        return (cache if cache is not None else like), note

    def _generate(self, settings, params, limit, cache, writer, f) -> Iterator[Event]:
        """Generation through the output filter, streamed into the store; a KeyboardInterrupt
        thrown in here (`generate.wind_down`) is handed on to generation."""
        s = self.service
        events = None
        done: Done | None = None
        try:
            events = generate(
                s.model,
                s.tokenizer,
                self.prompt.ids,
                params=params,
                max_tokens=limit,
                stop_strings=settings.stop,
                cache=cache,
                stop_event=self.stop,
                draft=s.draft,
                forward=s.forward,
            )
            if f is not None:
                from .output_filter import filtered

                events = filtered(events, f)
            thrown: BaseException | None = None
            while True:
                try:
                    event = events.throw(thrown) if thrown is not None else next(events)
                except StopIteration:
                    break
                thrown = None
                if isinstance(event, Chunk) and writer is not None:
                    # a filtered chunk's token is -1 (its id could decode to what the filter
                    # removes later), which the writer skips
                    writer.append(event.text, event.token)
                elif isinstance(event, Done):
                    event.stats.history_rerendered = not self.prompt.token_exact
                    done = event
                    if writer is not None:
                        self._finish(writer, event.stats.finish_reason, event)
                try:
                    yield event
                except KeyboardInterrupt as e:
                    thrown = e
        finally:
            if events is not None:
                events.close()
            if writer is not None and done is None:  # an error, or the consumer went away
                self._finish(writer, "error")
        if self.store_error is not None and writer is not None:
            yield Note(f"the answer could not be saved: {self.store_error}")
        if self.deleted:
            yield Note("the conversation was deleted while answering: the answer was not saved")
        if done is not None and done.stats.generated_tokens and not done.tokens:
            # The filter removed part of the answer: its keys and values would keep it.
            cache.truncate(len(self.prompt.ids))

    def _finish(self, writer: AnswerWriter, reason: str, done: Done | None = None) -> None:
        if done is None:
            error = writer.finish(reason)
        else:
            error = writer.finish(reason, done.stats, tokens=done.tokens, text=done.text)
        self.store_error = error or self.store_error
        self.deleted = writer.deleted

    def _keep(self, cache: KVCache, key: str | None, writer) -> Iterator[Event]:
        """Keep the cache for the next turn: in memory, and on disk while the conversation
        exists. Kept first and checked after, so a deletion at any moment in between (here
        or in another process) still removes both."""
        s = self.service
        if self.deleted:
            if key is not None:
                s.caches.forget(key)
            return
        s.caches.put(cache, key)
        if key is None or s.store is None:
            return
        try:
            if s.saved is not None and cache.offset and s.store.exists(key):
                s.saved.save(key, cache, s.identity())
            if not s.store.exists(key):
                s.caches.forget(key)
                if s.saved is not None:
                    s.saved.remove(key)
        except ApertusError as e:  # only the speed-up of the next turn is lost
            yield Note(str(e))
