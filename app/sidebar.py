"""The conversation list with its search box: every saved conversation, or the ones the
history's full-text index finds. It reads the store and says which one the user picked
(`Chosen`); what to show is the app's decision."""

from __future__ import annotations

from textual import on
from textual.app import ComposeResult
from textual.containers import Vertical
from textual.message import Message
from textual.widgets import Input, Label, ListItem, ListView

LIST_LIMIT = 200  # most recent conversations listed without a search


class ConversationItem(ListItem):
    def __init__(self, conversation_id: str, title: str, detail: str = "") -> None:
        super().__init__(
            Label(title, markup=False),
            *([Label(detail, classes="hit", markup=False)] if detail else []),
        )
        self.conversation_id = conversation_id


class Sidebar(Vertical):
    class Chosen(Message):
        def __init__(self, conversation_id: str) -> None:
            super().__init__()
            self.conversation_id = conversation_id

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.current: str | None = None  # highlighted when listed

    def compose(self) -> ComposeResult:
        yield Input(placeholder="Search history (F3)", id="search")
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
                items.append(ConversationItem(c.id, c.title or "untitled"))
        view = self.query_one("#conversations", ListView)
        view.clear()
        view.extend(items)
        view.index = next((i for i, it in enumerate(items) if it.conversation_id == current), None)

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
