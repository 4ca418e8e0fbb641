"""Conversations with one model, for the chat UI: messages in, events out.

The session keeps the KV cache of everything the model has already read, so a follow-up turn
prefills only what is new (the longest common prefix with the cached tokens is reused). Errors
become an `Error` event: a UI worker thread never dies with a traceback.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

from .generate import DEFAULT_MAX_TOKENS, Done, Event, Forward, generate
from .prompt import ConversationIds, conversation_ids
from .sampling import SamplingParams

if TYPE_CHECKING:
    from .saved_caches import SavedCaches
    from .speculative import Draft


@dataclass
class Error:
    message: str


class ChatSession:
    """One model's conversations: the KV cache of what the model has read, reused per turn.

    The prompt keeps each past answer as the tokens the model produced
    (`prompt.conversation_ids`), so a follow-up turn reads only the new message. With
    `saved` (a `SavedCaches`) and an `identity` of the model, each conversation's cache is
    also kept on disk: switching back to a conversation, or reopening it after a restart,
    reads only what is new there too.
    """

    def __init__(
        self,
        model,
        tokenizer,
        system: str | None = None,
        params: SamplingParams | None = None,
        enable_thinking: bool = False,
        max_tokens: int = DEFAULT_MAX_TOKENS,
        draft: Draft | None = None,
        saved: SavedCaches | None = None,
        identity: dict[str, str] | None = None,
    ):
        self.model = model
        self.tokenizer = tokenizer
        self.params = params or SamplingParams.from_defaults(model.generation)
        self.enable_thinking = enable_thinking
        self.max_tokens = max_tokens
        self.draft = draft  # speculative decoding; settable between turns, keeps its own cache
        self.saved, self.identity = saved, identity
        self.messages: list[dict] = [{"role": "system", "content": system}] if system else []
        self.conversation_id: str | None = None
        self.forward = Forward(model)  # its compiled graphs serve every turn
        self.cache = model.make_cache()
        self._cached_ids: list[int] = []  # the tokens whose keys/values the cache holds
        self._prompt_length = 0  # of the last answer's prompt

    def prompt(self, messages: list[dict] | None = None) -> ConversationIds:
        """The prompt for `messages` (default: the session's) as the model reads it."""
        return conversation_ids(
            self.tokenizer,
            self.messages if messages is None else messages,
            enable_thinking=self.enable_thinking,
        )

    def prompt_ids(self, messages: list[dict] | None = None) -> list[int]:
        return self.prompt(messages).ids

    def reply(
        self, text: str, stop_event: threading.Event | None = None
    ) -> Iterator[Event | Error]:
        """Add a user turn and stream the assistant's answer; the answer joins the history,
        even when interrupted, so nothing the user saw is lost."""
        self.messages.append({"role": "user", "content": text})
        return self._answer(stop_event)

    def answer(
        self,
        messages: list[dict],
        stop_event: threading.Event | None = None,
        conversation_id: str | None = None,
    ) -> Iterator[Event | Error]:
        """Stream the answer to a whole conversation (ending with the user's turn; assistant
        messages may carry their `tokens`): how a UI with stored history, branches and edits
        asks. `conversation_id` names the conversation whose saved cache to use."""
        self._switch(conversation_id)
        self.messages = [dict(m) for m in messages]
        return self._answer(stop_event)

    def persist(self, answer_kept: bool = True) -> str | None:
        """Save this conversation's cache (see `SavedCaches`); an error message if that failed.

        `answer_kept=False` (the output filter removed part of the answer) saves only the
        prompt's positions: the answer's keys and values would keep what was removed.
        """
        if self.saved is None or self.conversation_id is None or not self._cached_ids:
            return None
        tokens = self._cached_ids if answer_kept else self._cached_ids[: self._prompt_length]
        try:
            self.saved.save(self.conversation_id, self.cache, tokens, self.identity or {})
        except OSError as e:
            return f"KV cache not saved: {e.strerror or e}"
        return None

    def _switch(self, conversation_id: str | None) -> None:
        if conversation_id == self.conversation_id:
            return
        self.conversation_id = conversation_id
        loaded = None
        if self.saved is not None and conversation_id is not None:
            loaded = self.saved.load(conversation_id, self.model, self.identity or {})
        self.cache, self._cached_ids = loaded or (self.model.make_cache(), [])

    def _answer(self, stop_event: threading.Event | None) -> Iterator[Event | Error]:
        try:
            prompt = self.prompt()
            ids = prompt.ids
            self._cached_ids = self._cached_ids[: self.cache.keep_prefix(self._cached_ids, ids)]
            self._prompt_length = len(ids)
            for event in generate(
                self.model,
                self.tokenizer,
                ids,
                params=self.params,
                max_tokens=self.max_tokens,
                cache=self.cache,
                stop_event=stop_event,
                draft=self.draft,
                forward=self.forward,
            ):
                if isinstance(event, Done):
                    event.stats.history_rerendered = not prompt.token_exact
                    self._cached_ids = (ids + event.tokens)[: self.cache.offset]
                    answer = {"role": "assistant", "content": event.text, "tokens": event.tokens}
                    self.messages.append(answer)
                yield event
        except Exception as e:  # noqa: BLE001 - reported to the UI, which stays alive
            self.messages.pop() if self.messages[-1]["role"] == "user" else None
            self.cache.truncate(0)
            self._cached_ids = []
            yield Error(str(e) or type(e).__name__)
