"""The app's downloads: one at a time on its own thread, the rest queued, running on while the
user chats or browses; progress goes to the app as messages (the status bar and the models
screen show it).

Downloads are network work, no MLX: they never wait for the model thread, nor it for them.
A cancelled download keeps the files that arrived whole; choosing the model again fetches
only the rest.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

from textual.message import Message


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
    """One download on its own thread; `cancel()` stops it (the whole files stay)."""

    def __init__(self, repo: str, post: Callable[[Message], object]) -> None:
        self.repo = repo
        self.done = self.total = 0
        self.rate = 0.0
        self.cancelling = False
        self._first: tuple[float, int] | None = None  # (time, bytes) of the first report
        self._cancel = threading.Event()
        self._post = post
        self._last = 0.0
        self.thread = threading.Thread(target=self._run, name="apertus-mlx-download", daemon=True)
        self.thread.start()

    def cancel(self) -> None:
        self.cancelling = True
        self._cancel.set()

    def seen(self, done: int, total: int) -> None:
        """A progress report reached the UI: keep it and the rate since the first one (bytes
        already on disk, from an earlier download, are not speed)."""
        now = time.monotonic()
        if self._first is None:
            self._first = (now, done)
        since, start = self._first
        self.rate = (done - start) / (now - since) if now - since > 0.5 else 0.0
        self.done, self.total = done, total

    @property
    def percent(self) -> int:
        return min(99, self.done * 100 // self.total) if self.total else 0

    def line(self) -> str:
        return progress_line(self.done, self.total, self.rate)

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
            from .worker import describe_error

            self._post(DownloadFinished(self.repo, describe_error(e)))
        else:
            self._post(DownloadFinished(self.repo, None))


class Downloads:
    """The running download and the queue behind it. Lives on the UI thread: `add`, `cancel`
    and `finished` are called there; the threads only post messages."""

    def __init__(self, post: Callable[[Message], object]) -> None:
        self._post = post
        self.active: Download | None = None
        self.queued: list[str] = []

    def add(self, repo: str) -> str:
        """Start `repo` or queue it; returns "started", "queued" or "already"."""
        if (self.active is not None and self.active.repo == repo) or repo in self.queued:
            return "already"
        if self.active is None:
            self.active = Download(repo, self._post)
            return "started"
        self.queued.append(repo)
        return "queued"

    def cancel(self, repo: str | None = None) -> str | None:
        """Cancel `repo` (queued or running; None: the running one); the repo, or None."""
        if repo is not None and repo in self.queued:
            self.queued.remove(repo)
            return repo
        if self.active is not None and repo in (None, self.active.repo):
            self.active.cancel()
            return self.active.repo
        return None

    def progress(self, message: DownloadProgress) -> None:
        if self.active is not None and self.active.repo == message.repo:
            self.active.seen(message.done, message.total)

    def finished(self, message: DownloadFinished) -> None:
        """The running download ended: start the next one in the queue."""
        if self.active is not None and self.active.repo == message.repo:
            self.active = None
        if self.active is None and self.queued:
            self.active = Download(self.queued.pop(0), self._post)

    def state(self, repo: str) -> str | None:
        """ "downloading 34%", "cancelling…", "queued", or None."""
        a = self.active
        if a is not None and a.repo == repo:
            return "cancelling…" if a.cancelling else f"downloading {a.percent}%"
        return "queued" if repo in self.queued else None

    def status(self) -> str:
        """One short line for the status bar; "" when nothing downloads."""
        a = self.active
        if a is None:
            return ""
        name = a.repo.rsplit("/", 1)[-1]
        name = name if len(name) <= 20 else name[:19] + "…"
        rate = f" · {human_bytes(a.rate)}/s" if a.rate > 0 else ""
        more = f" (+{len(self.queued)} queued)" if self.queued else ""
        return f"↓ {name} {a.percent}%{rate}{more}"

    def shutdown(self) -> None:
        self.queued.clear()
        if self.active is not None:
            self.active.cancel()
