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
    # Apertus's tools (OpenAI or flat JSON schemas); tool_choice "auto" (default), "none" (not
    # offered), "required" or a function's name (both enforced by a grammar).
    tools: list[dict] | None = None
    tool_choice: str | None = None
    json_schema: dict | None = None  # the answer must be JSON following it (a grammar)
    # OpenAI's penalties on what the answer already said (logits processors).
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    logprobs: int | None = None  # k >= 0: keep each token's log-probability and top k
    # messages: drop the oldest turns when the prompt does not fit (a chat); False refuses
    # the turn instead, saying by how much it is too long (an API client chose its history).
    drop_oldest: bool = True

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
    def chat(cls, messages: list[dict], settings: TurnSettings, **kw: Any) -> TurnRequest:
        """A conversation the caller carries (system/user/assistant/tool messages; assistant
        ones may carry the `tokens` they were generated as): nothing is stored."""
        return cls("messages", messages=messages, settings=settings, **kw)

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


# Besides these, a turn yields `format` events: `Chunk` (answer text), `ThoughtStart`,
# `Thought`, `ThoughtEnd` and `ToolCall`, and `generate.Done` last (text: the answer alone).
Event = Started | Note | Done | Any


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
        if getattr(model, "pipeline", None) is not None:
            saved = None  # this process holds only its own layers' keys and values
        self.store, self.saved = store, saved
        self.output_filter = output_filter or (lambda: None)
        self.draft = draft
        self.kv_bits = kv_bits
        self.caches = caches if caches is not None else PromptCaches()
        self.forward = Forward(model)  # its compiled graphs serve every turn
        self.window = model.args.max_position_embeddings
        model.make_cache(bits=kv_bits)  # refuses a layout this model cannot have, now

    def start(self, request: TurnRequest, stop: threading.Event | None = None, steps=None) -> Turn:
        """The turn (run it by iterating `events`). `steps`: a batch decoder's token source
        (`batch.BatchDecoder.steps`); its turns' events then include `generate.PENDING`."""
        return Turn(self, request, stop, steps)

    def delete(self, conversation_id: str) -> Conversation:
        """Delete a stored conversation for good (rows, search entries, saved cache) and the
        cache this service keeps of it in memory."""
        from .saved_caches import delete_conversation

        self.caches.forget(conversation_id)
        return delete_conversation(self.store, conversation_id, self.saved)

    def prompt(
        self, messages: list[dict], settings: TurnSettings, tools: list[dict] | None = None
    ) -> tuple[ConversationIds, int]:
        """The token-exact prompt of `messages`, its oldest turns left out where it would not
        leave the answer its reserve of the window; (prompt, how many messages were left out).
        UsageError when even the last message alone does not fit."""
        built: dict[int, ConversationIds] = {}
        template = {"enable_thinking": settings.thinking, "tools": tools}

        def count(kept: list[dict]) -> int:
            built[len(kept)] = conversation_ids(self.tokenizer, kept, **template)
            return len(built[len(kept)].ids)

        kept, dropped = fit_window(messages, count, self.window, self.reserve(settings))
        prompt = built.get(len(kept)) or conversation_ids(self.tokenizer, kept, **template)
        self.check_fits(len(prompt.ids))
        return prompt, dropped

    def whole_prompt(
        self, messages: list[dict], settings: TurnSettings, tools: list[dict] | None
    ) -> ConversationIds:
        """The token-exact prompt of all of `messages`; UsageError saying by how many tokens
        it is too long for the window (one token at least is left for the answer)."""
        prompt = conversation_ids(
            self.tokenizer, messages, enable_thinking=settings.thinking, tools=tools
        )
        if len(prompt.ids) >= self.window:
            over = len(prompt.ids) - self.window + 1
            raise UsageError(
                f"the prompt is too long: {len(prompt.ids)} tokens, {over} more than the "
                f"model's context of {self.window} leaves room for (one answer token)"
            )
        return prompt

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

    def __init__(
        self, service: TurnService, request: TurnRequest, stop: threading.Event | None, steps=None
    ):
        self.service, self.request, self.stop = service, request, stop
        self.steps = steps
        self.conversation_id: str | None = request.conversation_id
        self.answer_message_id: int | None = None
        self.store_error: StoreError | None = None  # the answer is not (all) in the history
        self.deleted = False  # the conversation was deleted while this turn ran
        self.prompt: ConversationIds | None = None
        self.settings: TurnSettings | None = None  # as resolved for this turn
        self.message: dict | None = None  # the answer as blocks, when it thought or called
        self.max_tokens = DEFAULT_MAX_TOKENS  # the answer's limit
        # With `request.logprobs`: (token id, log-probability, [(id, log-probability)...])
        # for each answer token, appended as generation goes (ahead of the parsed events).
        self.token_logprobs: list[tuple[int, float, list[tuple[int, float]]]] = []
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
        tools = _offered(r)
        if r.kind == "raw":
            ids = [int(i) for i in r.prompt_ids or ()]
            s.check_fits(len(ids))
            self.prompt, dropped = ConversationIds(ids, True), 0
        elif not r.drop_oldest:
            self.prompt, dropped = s.whole_prompt(messages, settings, tools), 0
        else:
            self.prompt, dropped = s.prompt(messages, settings, tools)
        # Everything that can refuse the turn, before anything is written:
        params = settings.params(s.model.generation)
        f = s.output_filter()  # a damaged filter too: no answer goes out unfiltered
        limit = self.max_tokens = settings.max_tokens or DEFAULT_MAX_TOKENS
        shape = _Shape.of(s, r, settings, tools, self.prompt.ids, limit)
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
        yield from self._generate(settings, params, limit, cache, writer, f, shape)
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
            {"role": m.role, "content": {"blocks": m.parts} if m.parts else m.content,
             "tokens": m.tokens}
            for m in path
            if m.role in ("user", "assistant")
        ]  # fmt: skip
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
            # the new question and its answer's row together; answering again (no new
            # text), the path already ends with the user's message
            parent = path[-1].id if path else None
            writer = store.start_answer(
                conversation.id, parent, settings=record, seed=settings.seed, question=r.text
            )
            user_id = parent if r.text is None else writer.question_id
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

    def _generate(self, settings, params, limit, cache, writer, f, shape) -> Iterator[Event]:
        """Generation, read as Apertus's format (thoughts, calls, answer text) through the
        output filter, streamed into the store. A KeyboardInterrupt thrown in here (at a
        yield) stops the answer as the stop event would: it ends with `Done`."""
        from . import format as fmt

        s = self.service
        interrupted = threading.Event()
        outer = self.stop

        class Stop:  # what generate asks after every token
            @staticmethod
            def is_set() -> bool:
                return interrupted.is_set() or (outer is not None and outer.is_set())

        raw = generate(
            s.model,
            s.tokenizer,
            self.prompt.ids,
            params=params,
            max_tokens=limit,
            stop_strings=settings.stop,
            end_tokens=shape.end_tokens,
            cache=cache,
            stop_event=Stop,
            draft=None if shape.processors else s.draft,
            forward=s.forward,
            logits_processors=shape.processors,
            logprobs=self.request.logprobs,
            steps=self.steps,
        )
        removed = _Removals(f) if f is not None else None
        events = self._tokens_to_store(raw, writer, stream_ids=f is None)
        if shape.parser is None:  # a raw completion: the text as it is
            events = (fmt.Chunk(e.text) if isinstance(e, Chunk) else e for e in events)
        else:
            events = fmt.parse_generation(events, shape.parser)
        if removed is not None:
            events = fmt.filter_events(events, removed)
        kept: list = []  # the answer's events, for the message to keep
        done: Done | None = None
        try:
            while True:
                try:
                    event = next(events)
                except StopIteration:
                    break
                if getattr(event, "pending", False):  # the batch computes the next token
                    yield event
                    continue
                if isinstance(event, Done):
                    done = self._done(event, kept, removed, shape, cache, writer)
                    event = done
                elif isinstance(event, fmt.FormatWarning):
                    event = Note(event.message)
                else:
                    kept.append(event)
                    if isinstance(event, fmt.Chunk) and writer is not None:
                        writer.append(event.text)
                try:
                    yield event
                except KeyboardInterrupt:
                    interrupted.set()  # generation sees it at its next token and ends
        finally:
            raw.close()
            if writer is not None and done is None:  # an error, or the consumer went away
                self._finish(writer, "error")
        if self.store_error is not None and writer is not None:
            yield Note(f"the answer could not be saved: {self.store_error}")
        if self.deleted:
            yield Note("the conversation was deleted while answering: the answer was not saved")
        for processor in shape.processors:
            if getattr(processor, "closed_early", False):
                yield Note("the answer was closed early to stay within its token limit")

    def _tokens_to_store(self, events, writer, stream_ids: bool):
        """`generate`'s events, each token id streamed into the store as it comes (not with a
        filter: an id could spell what the filter removes later)."""
        for event in events:
            if isinstance(event, Chunk) and event.logprob is not None:
                self.token_logprobs.append((event.token, event.logprob, event.top_logprobs))
            if stream_ids and writer is not None and isinstance(event, Chunk):
                writer.append("", event.token)
            yield event

    def _done(self, done: Done, kept: list, removed, shape, cache, writer) -> Done:
        """The turn's `Done`: the answer text alone, its deliberation and calls apart; the
        token ids only if the filter removed nothing (they would spell what it removed); the
        answer written to the store."""
        from . import format as fmt

        text = "".join(e.text for e in kept if isinstance(e, fmt.Chunk))
        thoughts = [e.text for e in kept if isinstance(e, fmt.Thought)]
        calls = [e for e in kept if isinstance(e, fmt.ToolCall)]
        tokens = [] if removed is not None and removed.count else done.tokens
        done = Done(text, done.stats, tokens, "".join(thoughts) if thoughts else None, calls)
        done.stats.history_rerendered = not self.prompt.token_exact
        structured = any(isinstance(e, fmt.ThoughtStart | fmt.ToolCall) for e in kept)
        self.message = fmt.assistant_message(kept) if structured else None
        if not tokens and done.stats.generated_tokens:
            # The filter removed part of the answer: its keys and values would keep it.
            cache.truncate(len(self.prompt.ids))
        if writer is not None:
            parts = self.message["content"]["blocks"] if self.message else None
            self._finish(writer, done.stats.finish_reason, done, parts)
        return done

    def _finish(
        self, writer: AnswerWriter, reason: str, done: Done | None = None, parts=None
    ) -> None:
        if done is None:
            error = writer.finish(reason)
        else:
            error = writer.finish(
                reason, done.stats, tokens=done.tokens, text=done.text, parts=parts
            )
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


def _offered(request: TurnRequest) -> list[dict] | None:
    """The tools the model is told about (none with tool_choice "none"), normalized."""
    from .format import normalize_tools

    if not request.tools or request.tool_choice == "none":
        return None
    return normalize_tools(request.tools)


@dataclass
class _Shape:
    """How this turn's answer is read and held to its form: the format parser, the end
    tokens, and the grammar's logits processor when the answer must be JSON or a call."""

    parser: Any
    end_tokens: tuple[int, ...]
    processors: list

    @classmethod
    def of(cls, s: TurnService, r: TurnRequest, settings, tools, prompt, limit) -> _Shape:
        from . import format as fmt
        from .sampling import make_penalty_processor

        base = s.model.generation.eos_token_ids
        penalty = make_penalty_processor(r.frequency_penalty, r.presence_penalty, len(prompt))
        extra = [penalty] if penalty is not None else []
        if r.kind == "raw":
            return cls(None, tuple(base), extra)
        control = fmt.ControlIds.from_tokenizer(s.tokenizer)
        ends = fmt.end_tokens(s.tokenizer, base, tools_offered=bool(tools))
        parser = fmt.FormatParser(
            s.tokenizer, tools, control=control, in_thought=fmt.thought_open(prompt, control)
        )
        choice = r.tool_choice
        if not (tools and choice not in (None, "auto", "none")) and r.json_schema is None:
            return cls(parser, ends, extra)
        from . import constrained

        if tools and choice not in (None, "auto", "none"):
            name = None if choice == "required" else choice
            if name is not None and name not in fmt.tool_names(tools):
                raise UsageError(f"tool_choice names {name!r}, which is not among the tools")
            grammar = constrained.tool_call_grammar(
                tools, control, name=name, thinking=settings.thinking
            )
        else:
            grammar = constrained.json_schema_grammar(
                r.json_schema, control, thinking=settings.thinking
            )
        constraint = constrained.Constraint.build(grammar, s.model, s.tokenizer, end_tokens=ends)
        return cls(parser, ends, [*extra, constraint.processor(limit)])


class _Removals:
    """The output filter, counting what its streams removed: token ids that could spell
    removed text are not kept."""

    def __init__(self, f: OutputFilter):
        self._filter = f
        self._streams: list = []

    def stream(self):
        stream = self._filter.stream()
        self._streams.append(stream)
        return stream

    @property
    def count(self) -> int:
        return sum(s.removed for s in self._streams)
