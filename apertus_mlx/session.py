"""A conversation with one model, for the chat UI: messages in, events out.

The session keeps the KV cache of everything the model has already read, so a follow-up turn
prefills only what is new (the longest common prefix with the cached tokens is reused). Errors
become an `Error` event: a UI worker thread never dies with a traceback.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

from .generate import DEFAULT_MAX_TOKENS, Done, Event, generate
from .sampling import SamplingParams

if TYPE_CHECKING:
    from .speculative import Draft


@dataclass
class Error:
    message: str


class ChatSession:
    def __init__(
        self,
        model,
        tokenizer,
        system: str | None = None,
        params: SamplingParams | None = None,
        enable_thinking: bool = False,
        max_tokens: int = DEFAULT_MAX_TOKENS,
        draft: Draft | None = None,
    ):
        self.model = model
        self.tokenizer = tokenizer
        self.params = params or SamplingParams.from_defaults(model.generation)
        self.enable_thinking = enable_thinking
        self.max_tokens = max_tokens
        self.draft = draft  # speculative decoding; settable between turns, keeps its own cache
        self.messages: list[dict] = [{"role": "system", "content": system}] if system else []
        self.cache = model.make_cache()
        self._cached_ids: list[int] = []  # the tokens whose keys/values the cache holds

    def prompt_ids(self, messages: list[dict] | None = None) -> list[int]:
        """The prompt for `messages` (default: the session's) as the model reads it."""
        return self.tokenizer.apply_chat_template(
            self.messages if messages is None else messages,
            add_generation_prompt=True,
            enable_thinking=self.enable_thinking,
        )

    def reply(
        self, text: str, stop_event: threading.Event | None = None
    ) -> Iterator[Event | Error]:
        """Add a user turn and stream the assistant's answer; the answer joins the history,
        even when interrupted, so nothing the user saw is lost."""
        self.messages.append({"role": "user", "content": text})
        return self._answer(stop_event)

    def answer(
        self, messages: list[dict], stop_event: threading.Event | None = None
    ) -> Iterator[Event | Error]:
        """Stream the answer to a whole conversation (ending with the user's turn): how a UI
        with stored history, branches and edits asks. The cache keeps what this prompt shares
        with the previous one, so continuing the same conversation prefills only the new turn."""
        self.messages = [dict(m) for m in messages]
        return self._answer(stop_event)

    def _answer(self, stop_event: threading.Event | None) -> Iterator[Event | Error]:
        try:
            ids = self.prompt_ids()
            self._reuse_prefix(ids)
            for event in generate(
                self.model,
                self.tokenizer,
                ids,
                params=self.params,
                max_tokens=self.max_tokens,
                cache=self.cache,
                stop_event=stop_event,
                draft=self.draft,
            ):
                if isinstance(event, Done):
                    self._cached_ids = (ids + event.tokens)[: self.cache.offset]
                    self.messages.append({"role": "assistant", "content": event.text})
                yield event
        except Exception as e:  # noqa: BLE001 - reported to the UI, which stays alive
            self.messages.pop() if self.messages[-1]["role"] == "user" else None
            self.cache.truncate(0)
            self._cached_ids = []
            yield Error(str(e) or type(e).__name__)

    def _reuse_prefix(self, ids: list[int]) -> None:
        common = 0
        for a, b in zip(self._cached_ids, ids):
            if a != b:
                break
            common += 1
        common = min(common, len(ids) - 1)  # the last prompt token must be fed to get logits
        self.cache.truncate(common)
        self._cached_ids = self._cached_ids[:common]
