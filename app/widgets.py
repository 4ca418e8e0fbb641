"""The chat screen's widgets: the prompt, messages (an answer streams in as Markdown), the
conversation list and the status bar."""

from __future__ import annotations

import re
from pathlib import Path

from textual import events
from textual.app import ComposeResult
from textual.containers import Vertical
from textual.message import Message
from textual.widgets import Collapsible, Markdown, Static, TextArea
from textual.widgets.markdown import MarkdownStream

from .display_text import DisplayFilter, for_display

CONTEXT_FULL = "stopped: the context window is full (ctrl+n starts a new chat)"
FINISH_LABELS = {
    "stop": "done",
    "length": "stopped: length (raise max tokens in Settings, ctrl+s, for longer answers)",
    "interrupted": "stopped: interrupted",
    "error": "stopped: error",
}
FLUSH_S = 0.1  # a streaming answer's redraws: ten a second at most
NEWLINE_KEYS = ("ctrl+j", "shift+enter", "alt+enter")
CODE_BLOCK = re.compile(r"^```[^\n]*\n(.*?)^```", re.S | re.M)


def warm_markdown() -> None:
    """Compile the regular expressions Markdown parsing compiles on first use (linkify-it's
    link and e-mail patterns: about 80 ms of CPU), so they are ready before the first answer
    streams instead of stalling it. Run on a thread: it holds the GIL only in short pieces."""
    from markdown_it import MarkdownIt

    MarkdownIt("gfm-like").parse("See https://example.com, www.example.com or a@example.com.")


def code_blocks(text: str) -> list[str]:
    """The fenced code blocks of a Markdown answer, in order (a block still open is skipped)."""
    return [m.group(1) for m in CODE_BLOCK.finditer(text)]


def format_stats(stats, window: int | None = None) -> str:
    """One line under an answer: what it cost and why it ended (a "length" stop that filled
    the model's context `window` says so: more max tokens would not help)."""
    reason = FINISH_LABELS.get(stats.finish_reason, f"stopped: {stats.finish_reason}")
    if (
        stats.finish_reason == "length"
        and window
        and (stats.prompt_tokens + stats.generated_tokens >= window - 1)
    ):
        reason = CONTEXT_FULL
    cached = f" ({stats.cached_tokens} cached)" if stats.cached_tokens else ""
    first = "no token" if stats.ttft_s is None else f"first token {stats.ttft_s:.2f} s"
    return (
        f"{stats.generated_tokens} tokens · {stats.decode_tps:.1f} tok/s · "
        f"{first} · prompt {stats.prompt_tokens} tokens{cached} · "
        f"{reason}"
    )


def format_stored(finish_reason: str | None, stats: dict | None) -> str:
    """The status line of an answer read back from the store."""
    if finish_reason is None:
        return "unfinished (the app stopped while it was written)"
    s = stats or {}
    reason = FINISH_LABELS.get(finish_reason, f"stopped: {finish_reason}")
    if not s:
        return reason
    return f"{s.get('generated_tokens', 0)} tokens · {s.get('decode_tps', 0):.1f} tok/s · {reason}"


class PromptArea(TextArea):
    """A multi-line input: Enter sends, ctrl+j (or shift+enter where the terminal reports it)
    starts a new line."""

    class Submitted(Message):
        def __init__(self, text: str) -> None:
            super().__init__()
            self.text = text

    async def _on_key(self, event: events.Key) -> None:
        if event.key == "enter":
            event.stop()
            event.prevent_default()
            self.post_message(self.Submitted(self.text))
            return
        if event.key in NEWLINE_KEYS:
            event.stop()
            event.prevent_default()
            start, end = self.selection
            self._replace_via_keyboard("\n", start, end)
            return
        await super()._on_key(event)


class UserMessage(Static):
    """A user turn; clicking it copies its text."""

    def __init__(self, text: str, message_id: int | None = None) -> None:
        super().__init__(for_display(text), markup=False)
        self.text = text  # as sent and stored; the screen shows it made safe
        self.message_id = message_id

    def on_click(self) -> None:
        self.app.copy_to_clipboard(self.text)
        self.notify("Message copied")


class AnswerStatus(Static):
    """The line under an answer; clicking it opens the answer's details."""

    def on_click(self) -> None:
        answer = self.parent
        if isinstance(answer, AssistantMessage) and answer.message_id is not None:
            self.app.action_details(answer.message_id)


class Thoughts(Collapsible):
    """The model's deliberation above its answer: open while it thinks, folded once the
    answer starts (a click or Enter on its title opens it again)."""

    def __init__(self, text: str, collapsed: bool) -> None:
        super().__init__(Static(for_display(text), markup=False, classes="thoughts-text"),
                         title="Thoughts", collapsed=collapsed)  # fmt: skip
        self.text = text

    def add(self, text: str) -> None:
        self.text += text
        self.query_one(".thoughts-text", Static).update(for_display(self.text))


def stored_thoughts(parts: list[dict] | None) -> str:
    """The thoughts of a stored answer (its `thoughts` blocks), "" if it has none."""
    return "".join(str(p.get("text") or "") for p in parts or () if p.get("type") == "thoughts")


class AssistantMessage(Vertical):
    """The answer as Markdown, streamed while it is generated, then a status line; thoughts,
    when the model deliberated, in a fold above it."""

    def __init__(
        self,
        message_id: int | None = None,
        text: str = "",
        status: str | None = None,
        thoughts: str = "",
    ) -> None:
        super().__init__()
        self.message_id = message_id
        self.thoughts = thoughts
        self.text = text  # as generated and stored; what is drawn goes through display_text
        self.finished = status is not None
        self._status = status or "generating… (Esc stops)"
        self._stream: MarkdownStream | None = None
        self._shown = DisplayFilter()
        self._pending = ""  # shown text not yet handed to the Markdown stream
        self._flush_timer = None
        # a finished answer is drawn whole; a running one redrawn (switching back to its
        # chat) goes on streaming through the same filter from where its text so far ends
        self._initial = for_display(text) if self.finished else self._shown.feed(text)

    def compose(self) -> ComposeResult:
        if self.thoughts:
            yield Thoughts(self.thoughts, collapsed=bool(self.text) or self.finished)
        yield Markdown(self._initial, classes="answer")
        yield AnswerStatus(self._status, classes="status", markup=False)

    def on_click(self, event: events.Click) -> None:
        if isinstance(event.widget, AnswerStatus):
            return
        self.app.copy_to_clipboard(self.text)
        self.notify("Answer copied")

    async def think(self, text: str) -> None:
        """More deliberation: into the fold above the answer (made on the first thought)."""
        self.thoughts += text
        folds = self.query(Thoughts)
        if folds:
            folds.first().add(text)
        else:
            await self.mount(Thoughts(self.thoughts, collapsed=False), before=0)

    async def append(self, text: str) -> None:
        if not self.text:  # the answer starts: its thoughts fold away
            for fold in self.query(Thoughts):
                fold.collapsed = True
        self.text += text
        self._pending += self._shown.feed(text)
        if self._pending and self._flush_timer is None:
            # at most one Markdown update per FLUSH_S: each one restyles the answer's blocks,
            # so a fast model would otherwise keep the event loop busy (benchmarks/ui_stall.py)
            self._flush_timer = self.set_timer(FLUSH_S, self._flush)

    async def _flush(self) -> None:
        self._flush_timer = None
        shown, self._pending = self._pending, ""
        if not shown:
            return
        if self._stream is None:
            self._stream = Markdown.get_stream(self.query_one(Markdown))
        await self._stream.write(shown)

    async def finish(self, status: str, error: bool = False) -> None:
        if self._flush_timer is not None:
            self._flush_timer.stop()
            self._flush_timer = None
        rest, self._pending = self._pending + self._shown.flush(), ""
        if self._stream is not None:
            # the streamed blocks are the answer's (DisplayFilter's pieces add up to
            # `for_display` of the whole); drawing it all again would restyle every block
            # at once, the longest stall of a long answer
            await self._stream.write(rest)
            await self._stream.stop()
            self._stream = None
        else:
            await self.query_one(Markdown).update(for_display(self.text))
        self.finished = True
        self._status = status
        line = self.query_one(AnswerStatus)
        line.update(status)
        line.set_class(error, "error")

    @property
    def pending(self) -> bool:
        """Text appended but not drawn yet (it is, within FLUSH_S)."""
        return self._flush_timer is not None

    @property
    def status(self) -> str:
        return str(self.query_one(AnswerStatus).render())

    def set_version(self, text: str) -> None:
        """ "version 2/3" in front of the status line, for an answer with siblings."""
        line = self.query_one(AnswerStatus)
        line.update(f"{text} · {self._status}")


class Notice(Static):
    """An inline line in the conversation: an error or what the context budget dropped."""

    def __init__(self, text: str, error: bool = False) -> None:
        super().__init__(text, markup=False, classes="notice error" if error else "notice")


class StatusBar(Static):
    """Model · tokens/s · context used / window · what the app is doing."""

    def show(self, model: str | None, tps: float | None, used: int, window: int | None,
             activity: str = "", download: str = "") -> None:  # fmt: skip
        parts = [f"context {used}/{window or '–'}"]
        parts.append(f"{tps:.1f} tok/s" if tps is not None else "– tok/s")
        parts.append(short_model(model))
        if download:
            parts.append(download)
        if activity:
            parts.append(activity)
        self.update(" · ".join(parts))


def short_model(model: str | None, width: int = 28) -> str:
    """A repo id by its name, a local directory by its folder's (the full one is in the
    title), cut with "…" past `width` so the other fields keep their room."""
    if not model:
        return "no model"
    name = Path(model).name or model
    return name if len(name) <= width else name[: width - 1] + "…"
