"""The chat's state and its one way to the store, apart from the widgets that show them.

What the chat shows is a conversation of the history store (or a new one), maybe an answer
running (`Running`: one state, None when idle) and maybe a message being edited. Every store
call of the UI goes through `call`: a conversation deleted by another process, a locked or
read-only database, a full disk become one notification and the app keeps running. What a
turn does (branches, prompts, caches, settings) is the engine's turn service; this module only
says which turn the user asked for.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from apertus_mlx.errors import ApertusError, UnknownConversationError, UsageError
from apertus_mlx.turn import TurnRequest

from .settings import ChatSettings


@dataclass
class Running:
    """The answer being generated, wherever it is shown: its text so far lives here too, so
    switching back to its conversation shows all of it."""

    job: int
    conversation_id: str | None  # None until a new conversation's row exists
    message_id: int | None = None
    text: str = ""
    thoughts: str = ""
    question: str = ""  # what the user sent, given back to the message box if refused


class ChatController:
    def __init__(self, store, defaults: ChatSettings, error: Callable[[str], None],
                 lost: Callable[[], None]) -> None:  # fmt: skip
        self.store = store
        self.defaults = defaults  # for new chats
        self.conversation = None  # apertus_mlx.store.Conversation shown, None for a new one
        self.running: Running | None = None
        self.editing = None  # the user Message being edited
        self._error = error
        self._lost = lost  # the conversation shown is gone: show a new one

    # -- the one guarded way to the store ------------------------------------------------

    def call(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """`fn(*args, **kwargs)`, or None after saying what went wrong."""
        try:
            return fn(*args, **kwargs)
        except UnknownConversationError:
            self._error("That conversation is no longer in the history (deleted elsewhere?)")
            self.conversation = None
            self._lost()
        except (ApertusError, KeyError) as e:  # KeyError: a message deleted elsewhere
            self._error(f"History: {e}")
        return None

    def do(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> bool:
        """`call` for what returns nothing: whether it went through."""
        done = []
        self.call(lambda: (fn(*args, **kwargs), done.append(True)))
        return bool(done)

    def open(self, conversation_id: str | None) -> bool:
        """Make `conversation_id` (None: a new chat) the one shown; False if it is gone."""
        self.editing = None
        if conversation_id is None:
            self.conversation = None
            return True
        conversation = self.call(self.store.get_conversation, conversation_id)
        self.conversation = conversation
        return conversation is not None

    def refresh(self) -> None:
        """Read the shown conversation again (its leaf, title, settings moved)."""
        if self.conversation is not None:
            self.open(self.conversation.id)

    def branch(self) -> list:
        if self.conversation is None:
            return []
        return self.call(self.store.branch, self.conversation.id) or []

    def last_messages(self):
        """(last user message, last assistant message) of the current branch, or Nones."""
        branch = self.branch()
        users = [m for m in branch if m.role == "user"]
        answers = [m for m in branch if m.role == "assistant"]
        return (users[-1] if users else None), (answers[-1] if answers else None)

    # -- settings ------------------------------------------------------------------------

    @property
    def settings(self) -> ChatSettings:
        """The settings of the conversation shown, else of the next new one."""
        c = self.conversation
        if c is None:
            return self.defaults
        try:
            return ChatSettings.of(c)
        except (UsageError, TypeError):  # saved by another tool or version: not usable
            return self.defaults.with_(system=c.system, thinking=c.thinking)

    def save_settings(self, s: ChatSettings) -> None:
        if self.conversation is None:
            return
        updated = self.call(self.store.update_conversation, self.conversation.id,
                            settings=s.stored(), system=s.system, thinking=s.thinking)  # fmt: skip
        if updated is not None:
            self.conversation = updated

    # -- which turn the user asked for ---------------------------------------------------

    def send(self, text: str) -> TurnRequest:
        """The turn for a sent message: a new conversation, the next message, or an edit (a
        new branch after the edited message's parent)."""
        if self.conversation is None:
            return TurnRequest.new(text, self.settings)
        parent = "leaf" if self.editing is None else self.editing.parent_id
        return TurnRequest.follow(self.conversation.id, text, parent)

    def again(self) -> TurnRequest | None:
        """Another answer to the last user message (regenerate), None if there is none."""
        user, _ = self.last_messages()
        if user is None:
            return None
        return TurnRequest.again(self.conversation.id, user.id)
