"""The conversation on screen: one branch of a stored conversation, drawn from the store, with
the running answer streaming into its own widget.

The app decides what to show; this widget only draws it, so the store stays the one truth:
switching away and back redraws from the store plus the running answer's text so far.
"""

from __future__ import annotations

from collections.abc import Iterable

from textual.containers import VerticalScroll
from textual.widgets import Static

from .controller import Running
from .widgets import AssistantMessage, Notice, UserMessage, format_stored, stored_thoughts

EMPTY_HINT = "Type a message below and press Enter. F1 lists the keys; ctrl+p has every action."


class ConversationView(VerticalScroll):
    """The messages of a branch, oldest first; follows the end while an answer streams."""

    async def show(self, messages: Iterable | None, running: Running | None = None) -> None:
        """Draw store messages (None: a new, empty conversation). `running`: the answer being
        generated in this conversation, if any."""
        await self.remove_children()
        widgets: list = []
        if messages is None:
            widgets.append(Static(EMPTY_HINT, id="empty-hint"))
        else:
            for m in messages:
                if m.role == "user":
                    widgets.append(UserMessage(m.content, m.id))
                elif m.role == "assistant":
                    if running is not None and running.message_id == m.id:
                        widgets.append(AssistantMessage(m.id, running.text,
                                                        thoughts=running.thoughts))  # fmt: skip
                    else:
                        status = format_stored(m.finish_reason, m.stats)
                        thoughts = stored_thoughts(m.parts)
                        widgets.append(AssistantMessage(m.id, m.content, status, thoughts))
            if running is not None and running.message_id is None:
                widgets.append(AssistantMessage())  # its row is not in the store yet
        await self.mount_all(widgets)
        self.scroll_end(animate=False)
        self.anchor()

    async def add_turn(self, text: str, message_id: int | None = None) -> None:
        """A sent message and the place its answer will stream into."""
        await self.query("#empty-hint").remove()
        await self.mount_all([UserMessage(text, message_id), AssistantMessage()])
        self.scroll_end(animate=False)

    async def add_answer(self) -> None:
        """The place a new answer to the last message will stream into."""
        await self.mount(AssistantMessage())
        self.scroll_end(animate=False)

    def pending_user(self) -> UserMessage | None:
        """The sent message whose row the store does not have yet, if any."""
        for user in reversed(list(self.query(UserMessage))):
            return user if user.message_id is None else None
        return None

    def answers(self) -> list[AssistantMessage]:
        return list(self.query(AssistantMessage))

    def live_answer(self, message_id: int | None) -> AssistantMessage | None:
        """The unfinished answer widget for `message_id` (or one still without an id)."""
        for answer in reversed(self.answers()):
            if not answer.finished and answer.message_id in (None, message_id):
                return answer
        return None

    async def note(self, text: str, error: bool = False, before=None) -> None:
        """An inline line: an error, or what the context budget leaves out."""
        await self.mount(Notice(text, error=error), before=before)
        if before is None:
            self.scroll_end(animate=False)
