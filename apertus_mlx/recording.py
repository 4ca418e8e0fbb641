"""`generate --save` and `generate --continue ID`: one exchange saved to the history as it happens.

The user's message is committed before generation starts and the answer streams into the
store (`AnswerWriter`). Saving never stops an answer: a store that cannot be written to is
remembered and reported in one line once the answer is on the screen.
"""

from __future__ import annotations

import os
from dataclasses import asdict
from pathlib import Path
from typing import Any

import click

from .errors import StoreError, UsageError
from .store import AnswerWriter, Conversation, Store

SAMPLING_KEYS = ("temperature", "top_p", "top_k", "min_p", "repetition_penalty", "seed")


def model_identity(name: str) -> tuple[str, str | None]:
    """(model, revision) to record: a directory as an absolute path (no revision); a hub model
    as its repo id and the snapshot hash it runs from."""
    path = Path(name).expanduser()
    if path.is_dir():
        return os.path.abspath(path), None  # symlinks kept: the user may re-point them
    from .hub import repo_for, resolve_model

    snapshot = resolve_model(name)
    return repo_for(name), snapshot.name if snapshot.parent.name == "snapshots" else None


class Recorder:
    """Saves one `generate` exchange; `--continue` also supplies the conversation's settings."""

    def __init__(self, continue_id: str | None, raw: bool = False):
        if raw:
            raise UsageError("--save and --continue keep chats: drop --no-chat-template")
        self.store: Store | None = None
        self.conversation: Conversation | None = None
        self.writer: AnswerWriter | None = None
        self.error: StoreError | None = None
        self._answer_settings: dict[str, Any] = {}
        self.identity: tuple[str, str | None] | None = None  # (model, revision) recorded
        self.history_rerendered = False
        try:
            self.store = Store.open()
        except StoreError as e:
            if continue_id is not None:
                raise  # nothing to continue from
            self.error = e
        if continue_id is not None:
            self.conversation = self.store.get_conversation(continue_id)

    def merge(
        self,
        sampling: dict[str, Any],
        model: str | None,
        system: str | None,
        thinking: bool | None,
        max_tokens: int | None,
        stop: tuple[str, ...],
        model_typed: bool = True,
    ) -> tuple[str | None, str | None, bool, int | None, tuple[str, ...]]:
        """The continued conversation's settings where the command line gives none (a model
        from the environment, not typed, does not replace the conversation's).
        Fills `sampling` in place; returns model, system, thinking, max_tokens, stop."""
        c = self.conversation
        if c is None:
            return model, system, bool(thinking), max_tokens, stop
        if not model_typed:
            model = c.model or model
        for key in SAMPLING_KEYS:
            if sampling.get(key) is None:
                sampling[key] = c.settings.get(key)
        return (
            model or c.model,
            c.system if system is None else system,
            c.thinking if thinking is None else thinking,
            max_tokens or c.settings.get("max_tokens"),
            stop or tuple(c.settings.get("stop") or ()),
        )

    def prompt_ids(
        self,
        tokenizer,
        text: str,
        system: str | None,
        thinking: bool,
        window: int,
        reserve: int,
    ) -> list[int]:
        """The current branch (when continuing) and the new message, with each past answer as
        the tokens the model produced (see `prompt.conversation_ids`), its oldest turns left
        out (said on stderr) where it would not leave `reserve` tokens of the model's
        `window` for the answer."""
        from .prompt import conversation_ids, fit_window

        messages = [{"role": "system", "content": system}] if system else []
        if self.conversation is not None:
            branch = self.store.branch(self.conversation.id)
            messages += [
                {"role": m.role, "content": m.content, "tokens": m.tokens}
                for m in branch
                if m.role in ("user", "assistant")
            ]
        messages.append({"role": "user", "content": text})

        def count(kept: list[dict]) -> int:
            return len(conversation_ids(tokenizer, kept, enable_thinking=thinking).ids)

        messages, dropped = fit_window(messages, count, window, reserve)
        if dropped:
            click.echo(
                f"[the conversation is longer than the model's context ({window} tokens): "
                f"its {dropped} oldest messages are left out of this prompt]",
                err=True,
            )
        prompt = conversation_ids(tokenizer, messages, enable_thinking=thinking)
        self.history_rerendered = not prompt.token_exact
        return prompt.ids

    def begin(
        self,
        text: str,
        model_name: str,
        system: str | None,
        thinking: bool,
        params,
        max_tokens: int | None,
        stop: tuple[str, ...],
    ) -> None:
        """Record the conversation's settings and commit the user's message."""
        if self.store is None:
            return
        settings = {**asdict(params), "max_tokens": max_tokens, "stop": list(stop)}
        self._answer_settings = settings
        fields = dict(system=system, settings=settings, thinking=thinking)
        try:
            model, revision = model_identity(model_name)
            self.identity = (model, revision)
            if self.conversation is None:
                self.conversation = self.store.create_conversation(
                    model=model, revision=revision, **fields
                )
            else:
                self.store.update_conversation(
                    self.conversation.id, model=model, revision=revision, **fields
                )
            self.store.add_message(self.conversation.id, "user", text)
        except StoreError as e:
            self.error = e
            self.store = None  # the answer is still shown; nothing more is written

    def saved_cache(self, model, prompt: list[int]):
        """The conversation's saved KV cache, kept as far as `prompt` starts with its tokens
        (None: nothing saved for this model, or nothing in common)."""
        from .saved_caches import SavedCaches, identity

        if self.conversation is None or self.identity is None:
            return None
        saved = SavedCaches().load(self.conversation.id, model, identity(model, *self.identity))
        if saved is None:
            return None
        cache, tokens = saved
        return cache if cache.keep_prefix(tokens, prompt) else None

    def save_cache(self, model, cache, tokens: list[int]) -> None:
        """Keep the cache for the next `--continue` (a failure only costs that speed-up)."""
        from .saved_caches import SavedCaches, identity

        if self.conversation is None or self.identity is None:
            return
        try:
            SavedCaches().save(self.conversation.id, cache, tokens, identity(model, *self.identity))
        except OSError as e:
            click.echo(f"apertus-mlx: warning: KV cache not saved: {e.strerror or e}", err=True)

    def feed(self, event) -> None:
        """Pass on each event of `generate`: chunks stream into the store, Done finishes."""
        from .generate import Chunk, Done

        if self.store is None or (self.writer is None and not self._start()):
            return
        if isinstance(event, Chunk):
            self.writer.append(event.text, event.token)
        elif isinstance(event, Done):
            reason = event.stats.finish_reason
            done = self.writer.finish(reason, event.stats, tokens=event.tokens, text=event.text)
            self._finished(done)

    def close(self, finish_reason: str) -> None:
        """End an answer that stopped without `Done` (an error, a closed pipe)."""
        if self.writer is not None and self.store is not None:
            self._finished(self.writer.finish(finish_reason))

    def _start(self) -> bool:
        settings = self._answer_settings
        try:
            self.writer = self.store.start_answer(
                self.conversation.id, settings=settings, seed=settings.get("seed")
            )
            return True
        except StoreError as e:
            self._finished(e)
            return False

    def _finished(self, error: StoreError | None) -> None:
        self.error = error or self.error
        self.store = None  # nothing more to write

    def report(self, as_json: bool) -> dict[str, Any]:
        """Say where the exchange went (stderr) and give `conversation_id` for --json output."""
        cid = self.conversation.id if self.conversation is not None else None
        if self.error is None and not as_json:
            click.echo(f"saved as {cid}", err=True)
        return {"conversation_id": cid}

    def raise_error(self) -> None:
        """Last, once the answer is out: a failed save is the command's one error line."""
        if self.error is not None:
            raise StoreError(f"history not saved: {self.error}")
