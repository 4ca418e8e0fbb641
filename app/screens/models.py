"""The models screen: the catalog, what is downloaded (whole, or partly with how much) and its
size on disk; download (with progress, cancel and resume), delete, and choose the model of the
conversation.

Downloads belong to the app (`app.downloads`): they go on when this screen closes, and two
can queue. This screen shows them and starts or cancels them.
"""

from __future__ import annotations

from textual import on
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Vertical
from textual.screen import Screen
from textual.widgets import DataTable, Footer, Header, ProgressBar, Static

from ..downloads import DownloadFinished, DownloadProgress, human_bytes
from .dialogs import ConfirmScreen

INTRO = (
    "Enter downloads the highlighted model (if needed) and chats with it; downloads go on "
    "while you chat. ▶ this chat's model · ★ recommended · ✓ downloaded · "
    "◐ partly downloaded (Enter resumes) · ? not found on the hub yet"
)


class ModelsScreen(Screen[str | None]):
    """Dismisses with the repo id to chat with, or None."""

    BINDINGS = [
        Binding("escape", "close", "Back"),
        Binding("d", "delete", "Delete"),
        Binding("c", "cancel", "Cancel download"),
        Binding("r", "refresh", "Refresh"),
    ]

    def __init__(self, current: str | None = None, first_start: bool = False) -> None:
        super().__init__()
        self.current = current
        self.first_start = first_start
        self.local: dict = {}  # repo -> apertus_mlx.hub.LocalModel
        self.waiting: str | None = None  # downloading to chat with it as soon as it is whole

    @property
    def downloads(self):
        return self.app.downloads

    def compose(self) -> ComposeResult:
        yield Header()
        with Vertical(id="models"):
            if self.first_start and self.current:
                yield Static(
                    f"{self.current} is not (fully) downloaded. Press Enter to download the "
                    "rest, or choose another model.",
                    id="first-start",
                )
            elif self.first_start:
                yield Static(
                    "Welcome. No model is on this machine yet: the recommended one is "
                    "highlighted (small, fast, good on an 8 GB Mac). Press Enter to download it.",
                    id="first-start",
                )
            yield Static(INTRO, id="models-intro")
            yield DataTable(id="catalog", cursor_type="row", zebra_stripes=True)
            yield ProgressBar(id="download-bar", show_eta=False)
            yield Static("", id="download-status", markup=False)
        yield Footer()

    def on_mount(self) -> None:
        table = self.query_one(DataTable)
        # the size (or how much is downloaded) before the long repo id: seen at 80 columns
        table.add_columns(" ", "alias", "size", "repo", "format", "description")
        self.query_one("#download-bar").display = False
        self.refresh_table(first=True)
        self.show_download()
        table.focus()

    def entries(self):
        from apertus_mlx.hub import catalog, local_models

        self.local = local_models()
        rows = [(e.repo, e) for e in catalog()]
        known = {repo for repo, _ in rows}
        rows += [(repo, None) for repo in sorted(self.local) if repo not in known]
        return rows

    def is_downloaded(self, repo: str) -> bool:
        here = self.local.get(repo)
        return here is not None and here.complete

    def size_text(self, repo: str, entry) -> str:
        here = self.local.get(repo)
        state = self.downloads.state(repo)
        if state is not None:
            return state
        if here is not None and here.complete:
            return human_bytes(here.size_on_disk) + " on disk"
        if here is not None and here.size_on_disk:
            return f"partial ({here.state.percent}%)"
        return f"~{entry.size_gb:g} GB" if entry else ""

    def refresh_table(self, first: bool = False) -> None:
        """Redraw the rows; the cursor stays on the row it was on (first: on this chat's
        model, else the recommended one)."""
        from apertus_mlx.hub import recommended

        table = self.query_one(DataTable)
        keep = None if first else self.selected
        table.clear()
        best = recommended().repo
        highlight = 0
        for i, (repo, e) in enumerate(self.entries()):
            here = self.local.get(repo)
            mark = ("▶" if repo == self.current else " ") + ("★" if repo == best else " ")
            if self.is_downloaded(repo):
                mark += "✓"
            elif here is not None and here.size_on_disk:
                mark += "◐"
            else:
                mark += "?" if e and e.unconfirmed else " "
            table.add_row(mark, e.alias if e else "", self.size_text(repo, e), repo,
                          e.format if e else "", e.description if e else "",
                          key=repo)  # fmt: skip
            if repo == (keep or self.current or best):
                highlight = i
        table.move_cursor(row=highlight)

    @property
    def selected(self) -> str | None:
        table = self.query_one(DataTable)
        if not table.row_count:
            return None
        return table.coordinate_to_cell_key(table.cursor_coordinate).row_key.value

    @on(DataTable.RowSelected)
    def choose(self) -> None:
        """A whole model: chat with it. Otherwise download it (or the rest of it), or queue it
        behind the running download; the chat opens on it when it is whole."""
        repo = self.selected
        if repo is None:
            return
        if self.is_downloaded(repo):
            self.dismiss(repo)
            return
        self.waiting = repo
        how = self.downloads.add(repo)
        if how == "queued":
            self.notify(f"{repo} is queued after {self.downloads.active.repo}")
        elif how == "already":
            self.notify(f"{repo} is downloading; c cancels it")
        self.show_download()
        self.refresh_row(repo)

    def refresh_row(self, repo: str) -> None:
        from apertus_mlx.hub import catalog_entry

        table = self.query_one(DataTable)
        if repo in table.rows:
            column = list(table.columns)[2]
            table.update_cell(repo, column, self.size_text(repo, catalog_entry(repo)))

    def show_download(self) -> None:
        """The bar and the line under the table, from the app's running download."""
        bar = self.query_one("#download-bar", ProgressBar)
        active = self.downloads.active
        if active is None:
            bar.display = False
            return
        bar.display = True
        bar.update(total=active.total or None, progress=active.done)
        if active.cancelling:
            self.status(f"Cancelling {active.repo}… (the whole files stay)")
            return
        queued = f" · then {', '.join(self.downloads.queued)}" if self.downloads.queued else ""
        self.status(f"{active.repo}: {active.line()} · c cancels{queued}")

    def status(self, text: str, error: bool = False) -> None:
        line = self.query_one("#download-status", Static)
        line.update(text)
        line.set_class(error, "error")

    def download_progress(self, message: DownloadProgress) -> None:
        """Called by the app for each progress report."""
        self.show_download()
        self.refresh_row(message.repo)

    def download_finished(self, message: DownloadFinished) -> None:
        """Called by the app when a download ends (whole, failed or cancelled)."""
        self.refresh_table()
        self.show_download()
        if message.error:
            if self.downloads.active is None:
                self.status(f"{message.repo}: {message.error}", error=not message.cancelled)
            if message.repo == self.waiting:
                self.waiting = None
            return
        if message.repo == self.waiting and self.app.screen is self:
            self.dismiss(message.repo)
        elif self.downloads.active is None:
            self.status(f"{message.repo} downloaded")

    def action_cancel(self) -> None:
        """Cancel the highlighted model's download (queued or running), else the running one."""
        repo = self.selected
        if repo is None or self.downloads.state(repo) is None:
            repo = None
        cancelled = self.downloads.cancel(repo)
        if cancelled is None:
            self.notify("Nothing is downloading", severity="warning")
            return
        if cancelled == self.waiting:
            self.waiting = None
        self.show_download()
        self.refresh_row(cancelled)

    def action_refresh(self) -> None:
        self.refresh_table()

    def action_close(self) -> None:
        """Back to the chat; a download goes on (the status bar shows it)."""
        self.dismiss(None)

    def action_delete(self) -> None:
        repo = self.selected
        if repo is None or repo not in self.local:
            self.notify("That model is not downloaded", severity="warning")
            return
        if self.downloads.state(repo) is not None:
            self.notify("It is downloading: cancel it first (c)", severity="warning")
            return
        size = human_bytes(self.local[repo].size_on_disk)

        def confirmed(yes: bool | None) -> None:
            if not yes:
                return
            from apertus_mlx.hub import remove

            try:
                freed = remove(repo)
            except Exception as e:  # noqa: BLE001 - one line where the user looks
                self.notify(str(e), severity="error")
                return
            self.notify(f"Deleted {repo}, {human_bytes(freed)} freed")
            self.refresh_table()

        self.app.push_screen(ConfirmScreen(f"Delete {repo} ({size}) from this machine?"), confirmed)
