"""The conversation list with its search box: every saved conversation, or the ones the
history's full-text index finds. It reads the store and says which one the user picked
(`Chosen`); what to show is the app's decision."""

from __future__ import annotations

from datetime import datetime

from textual import on
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Vertical
from textual.message import Message
from textual.widgets import Input, Label, ListItem, ListView

from .display_text import for_display

LIST_LIMIT = 200  # most recent conversations listed without a search


TITLE_WIDTH = 24  # fits the wide list; the narrow one cuts it again with "…" (CSS)


def short_title(title: str | None, width: int = TITLE_WIDTH) -> str:
    """One line, cut with "…" when it is longer than `width`."""
    text = " ".join(for_display(title or "untitled").split()) or "untitled"
    return text if len(text) <= width else text[: width - 1].rstrip() + "…"


def when(timestamp: float, now: float | None = None) -> str:
    """ "14:05" today, "Mar 3" this year, "2024-03-03" before."""
    t = datetime.fromtimestamp(timestamp)
    today = datetime.fromtimestamp(now) if now is not None else datetime.now()
    if t.date() == today.date():
        return t.strftime("%H:%M")
    return t.strftime("%b %-d") if t.year == today.year else t.strftime("%Y-%m-%d")


class ConversationItem(ListItem):
    def __init__(self, conversation_id: str, title: str, detail: str = "",
                 date: str = "") -> None:  # fmt: skip
        super().__init__(
            Label(short_title(title), markup=False, classes="title"),
            Label(date, classes="date", markup=False),
            *([Label(for_display(detail), classes="hit", markup=False)] if detail else []),
        )
        self.conversation_id = conversation_id


class SearchInput(Input):
    """The search box: Esc clears the search and goes back to the message box."""

    BINDINGS = [Binding("escape", "clear", "Clear search")]

    def action_clear(self) -> None:
        self.parent.clear_search()


class Sidebar(Vertical):
    class Chosen(Message):
        def __init__(self, conversation_id: str) -> None:
            super().__init__()
            self.conversation_id = conversation_id

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.current: str | None = None  # highlighted when listed

    def compose(self) -> ComposeResult:
        yield SearchInput(placeholder="Search history (F3)", id="search")
        yield ListView(id="conversations")

    def refill(self, current: str | None = None) -> None:
        """List the conversations again (after a change), keeping the search typed."""
        self.current = current
        query = self.query_one("#search", Input).value
        items: list[ConversationItem] = []
        if query.strip():
            seen: set[str] = set()
            for hit in self.app.store.search(query):
                if hit.conversation_id not in seen:
                    seen.add(hit.conversation_id)
                    title = hit.title or "untitled"
                    items.append(ConversationItem(hit.conversation_id, title, hit.snippet))
        else:
            for c in self.app.store.list_conversations(limit=LIST_LIMIT):
                items.append(ConversationItem(c.id, c.title or "untitled",
                                              date=when(c.updated_at)))  # fmt: skip
        for item in items:  # the open conversation, marked whether or not it is highlighted
            item.set_class(item.conversation_id == current, "-open")
        view = self.query_one("#conversations", ListView)
        view.clear()
        view.extend(items)
        index = next((i for i, it in enumerate(items) if it.conversation_id == current), None)
        view.index = index if index is not None else (0 if items else None)

    def clear_search(self) -> None:
        """Esc in the search box: the search text goes, the whole list comes back."""
        search = self.query_one("#search", Input)
        if search.value:
            search.value = ""  # Changed refills the list
        self.screen.focus_prompt()

    def focus_search(self) -> None:
        self.display = True
        self.query_one("#search", Input).focus()

    @on(Input.Changed, "#search")
    def search_changed(self) -> None:
        from apertus_mlx.errors import ApertusError

        try:
            self.refill(self.current)
        except ApertusError as e:  # the store cannot be read now; the list stays as it was
            self.notify(f"History: {e}", severity="error")

    @on(Input.Submitted, "#search")
    def search_submitted(self) -> None:
        view = self.query_one("#conversations", ListView)
        if view.index is None and len(view):
            view.index = 0  # Enter again opens the best hit
        view.focus()

    @on(ListView.Selected, "#conversations")
    def selected(self, event: ListView.Selected) -> None:
        event.stop()
        if isinstance(event.item, ConversationItem):
            self.post_message(self.Chosen(event.item.conversation_id))
