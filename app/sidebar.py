"""The conversation list with its search box: every saved conversation, or the ones the
history's full-text index finds. It reads the store and says which one the user picked
(`Chosen`); what to show is the app's decision.

The list is one `OptionList` (its rows drawn as lines, only the visible ones), not a widget
per conversation: with a long history, hundreds of row widgets made every frame of a
streaming answer lay them all out again (`benchmarks/ui_stall.py --history 200`)."""

from __future__ import annotations

from datetime import datetime

from textual import on
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Vertical
from textual.content import Content
from textual.message import Message
from textual.widgets import Input, OptionList
from textual.widgets.option_list import Option

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


def conversation_row(conversation_id: str, title: str, *, date: str = "", detail: str = "",
                     open_: bool = False) -> Option:  # fmt: skip
    """A conversation's row: its title (marked when it is the one open), when it changed or
    the search hit's words. Text from the store is never read as markup."""
    lines = [Content.styled(short_title(title), "bold $accent" if open_ else "")]
    lines += [
        Content.styled(" ".join(text.split()), "$text-muted")
        for text in (date, for_display(detail))
        if text
    ]
    return Option(Content("\n").join(lines), id=conversation_id)


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
        yield OptionList(id="conversations")

    @property
    def listed(self) -> list[str]:
        """The conversations listed, top to bottom (their ids)."""
        return [row.id for row in self.query_one("#conversations", OptionList).options]

    def refill(self, current: str | None = None) -> None:
        """List the conversations again (after a change), keeping the search typed."""
        self.current = current
        query = self.query_one("#search", Input).value
        rows: list[Option] = []
        if query.strip():
            seen: set[str] = set()
            for hit in self.app.store.search(query):
                cid = hit.conversation_id
                if cid not in seen:
                    seen.add(cid)
                    title = hit.title or "untitled"
                    rows.append(
                        conversation_row(cid, title, detail=hit.snippet, open_=cid == current)
                    )
        else:
            for c in self.app.store.list_conversations(limit=LIST_LIMIT):
                date = when(c.updated_at)
                rows.append(
                    conversation_row(c.id, c.title or "untitled", date=date, open_=c.id == current)
                )
        view = self.query_one("#conversations", OptionList)
        if [o.id for o in view.options] == [r.id for r in rows]:
            # the same list (an answer ended in the open chat): only changed rows are drawn
            for i, (old, new) in enumerate(zip(view.options, rows)):
                if not old.prompt.is_same(new.prompt):
                    view.replace_option_prompt_at_index(i, new.prompt)
        else:
            view.set_options(rows)
        index = next((i for i, row in enumerate(rows) if row.id == current), None)
        view.highlighted = index if index is not None else (0 if rows else None)

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
        view = self.query_one("#conversations", OptionList)
        if view.highlighted is None and view.option_count:
            view.highlighted = 0  # Enter again opens the best hit
        view.focus()

    @on(OptionList.OptionSelected, "#conversations")
    def selected(self, event: OptionList.OptionSelected) -> None:
        event.stop()
        if event.option.id is not None:
            self.post_message(self.Chosen(event.option.id))
