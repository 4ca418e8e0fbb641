"""The models screen: the catalog, what is downloaded and its size on disk; download (with
progress, cancel and resume), delete, and choose the model of the conversation.

Downloads run on their own thread (network work, no MLX) and report through messages;
huggingface_hub keeps partial files, so a cancelled download resumes where it stopped.
"""

from __future__ import annotations

import threading
import time

from textual import on
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Vertical
from textual.message import Message
from textual.screen import Screen
from textual.widgets import DataTable, Footer, Header, ProgressBar, Static

from .dialogs import ConfirmScreen

INTRO = (
    "Enter downloads the highlighted model (if needed) and chats with it. "
    "▶ this chat's model · ★ recommended · ✓ downloaded · "
    "? repo id inferred from the naming, not seen on the hub yet"
)


def human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} GB"


def progress_line(done: int, total: int, rate: float) -> str:
    """ "1.2 GB / 2.3 GB · 45.1 MB/s · 24 s left": bytes, rate (bytes/s, 0 unknown) and ETA."""
    line = f"{human_bytes(done)} / {human_bytes(total)}" if total else human_bytes(done)
    if rate > 0:
        line += f" · {human_bytes(rate)}/s"
        if total > done:
            line += f" · {(total - done) / rate:.0f} s left"
    return line


class DownloadProgress(Message):
    def __init__(self, repo: str, done: int, total: int) -> None:
        super().__init__()
        self.repo, self.done, self.total = repo, done, total


class DownloadFinished(Message):
    """`error` is one line, None on success; `cancelled` when the user stopped it."""

    def __init__(self, repo: str, error: str | None, cancelled: bool = False) -> None:
        super().__init__()
        self.repo, self.error, self.cancelled = repo, error, cancelled


class Download:
    """One download on its own thread; `cancel()` stops it (its partial files stay)."""

    def __init__(self, repo: str, post) -> None:
        self.repo = repo
        self.first: tuple[float, int] | None = None  # (time, bytes) of the first report
        self._cancel = threading.Event()
        self._post = post
        self._last = 0.0
        self.thread = threading.Thread(target=self._run, name="apertus-mlx-download", daemon=True)
        self.thread.start()

    def cancel(self) -> None:
        self._cancel.set()

    def _progress(self, done: int, total: int) -> None:
        now = time.monotonic()
        if now - self._last >= 0.1 or done >= total:  # at most ten updates a second
            self._last = now
            self._post(DownloadProgress(self.repo, done, total))

    def _run(self) -> None:
        from apertus_mlx import hub

        try:
            hub.download(self.repo, progress=self._progress, cancel=self._cancel)
        except hub.DownloadCancelled:
            self._post(DownloadFinished(self.repo, "download cancelled", cancelled=True))
        except Exception as e:  # noqa: BLE001 - one line on the screen
            from ..worker import describe_error

            self._post(DownloadFinished(self.repo, describe_error(e)))
        else:
            self._post(DownloadFinished(self.repo, None))


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
        self.download: Download | None = None
        self.cached: dict = {}

    def compose(self) -> ComposeResult:
        yield Header()
        with Vertical(id="models"):
            if self.first_start:
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
        table.add_columns(" ", "alias", "repo", "format", "size", "description")
        self.query_one("#download-bar").display = False
        self.refresh_table()
        table.focus()

    def entries(self):
        from apertus_mlx.hub import cached_models, catalog

        self.cached = cached_models()
        rows = [(e.repo, e) for e in catalog()]
        known = {repo for repo, _ in rows}
        rows += [(repo, None) for repo in sorted(self.cached) if repo not in known]
        return rows

    def refresh_table(self) -> None:
        from apertus_mlx.hub import recommended

        table = self.query_one(DataTable)
        table.clear()
        best = recommended().repo
        highlight = 0
        for i, (repo, e) in enumerate(self.entries()):
            on_disk = self.cached.get(repo)
            mark = ("★" if repo == best else " ") + (
                "✓" if on_disk else "?" if e and e.unconfirmed else " "
            )
            size = (
                human_bytes(on_disk[1]) + " on disk"
                if on_disk
                else f"~{e.size_gb:g} GB"
                if e
                else ""
            )
            table.add_row(mark, e.alias if e else "", repo, e.format if e else "", size,
                          e.description if e else "", key=repo)  # fmt: skip
            if repo == (self.current or best):
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
        repo = self.selected
        if repo is None:
            return
        if repo in self.cached:
            if self.download is not None:
                self.download.cancel()  # it resumes when chosen again
            self.dismiss(repo)
        elif self.download is None:
            self.start_download(repo)
        else:
            self.notify(f"{self.download.repo} is downloading; c cancels it", severity="warning")

    def start_download(self, repo: str) -> None:
        bar = self.query_one("#download-bar", ProgressBar)
        bar.display = True
        bar.update(total=None, progress=0)
        self.status(f"Downloading {repo}… (c cancels; a later download resumes)")
        self.download = Download(repo, self.post_message)

    def status(self, text: str, error: bool = False) -> None:
        line = self.query_one("#download-status", Static)
        line.update(text)
        line.set_class(error, "error")

    def on_download_progress(self, message: DownloadProgress) -> None:
        bar = self.query_one("#download-bar", ProgressBar)
        bar.update(total=message.total or None, progress=message.done)
        rate = 0.0
        if self.download is not None:
            # measured from the first report: bytes already on disk (a resume) are not speed
            if self.download.first is None:
                self.download.first = (time.monotonic(), message.done)
            since, start = self.download.first
            elapsed = time.monotonic() - since
            rate = (message.done - start) / elapsed if elapsed > 0.5 else 0.0
        line = progress_line(message.done, message.total, rate)
        self.status(f"{message.repo}: {line} · c cancels")

    def on_download_finished(self, message: DownloadFinished) -> None:
        self.download = None
        self.query_one("#download-bar").display = False
        self.refresh_table()
        if message.error:
            self.status(f"{message.repo}: {message.error}", error=not message.cancelled)
            if not message.cancelled:
                self.notify(message.error, severity="error", title="Download failed")
            return
        self.status(f"{message.repo} downloaded")
        self.dismiss(message.repo)

    def action_cancel(self) -> None:
        if self.download is not None:
            self.download.cancel()
            self.status(f"Cancelling {self.download.repo}…")

    def action_refresh(self) -> None:
        self.refresh_table()

    def action_close(self) -> None:
        if self.download is not None:
            self.download.cancel()
        self.dismiss(None)

    def action_delete(self) -> None:
        repo = self.selected
        if repo is None or repo not in self.cached:
            self.notify("That model is not downloaded", severity="warning")
            return
        size = human_bytes(self.cached[repo][1])

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
