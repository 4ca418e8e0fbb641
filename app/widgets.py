"""Message widgets: the welcome panel, a user turn, and an assistant turn that streams in."""

from __future__ import annotations

from textual.app import ComposeResult
from textual.containers import Vertical
from textual.widgets import Markdown, Static
from textual.widgets.markdown import MarkdownStream

FINISH_LABELS = {
    "stop": "done",
    "length": "stopped: length (raise --max-tokens for longer answers)",
    "interrupted": "stopped: interrupted",
    "error": "stopped: error",
}


def welcome_text(aliases: list[tuple[str, str, str, float]]) -> str:
    """Markdown for the start screen when no model is given.

    aliases: (alias, parameters, format, download size in GB) from the catalog."""
    rows = "\n".join(f"| `{a}` | {p} | {f} | {gb:g} GB |" for a, p, f, gb in aliases)
    head = "| alias | parameters | format | download |\n|---|---|---|---|\n"
    table = f"Known models:\n\n{head}{rows}\n" if rows else ""
    return (
        "# Apertus chat\n\n"
        "No model is loaded. Start the chat on a model with\n\n"
        "```\napertus-mlx chat --model DIR_OR_REPO\n```\n\n"
        "where DIR_OR_REPO is a checkpoint directory, a downloaded Hugging Face repo id or a "
        "catalog alias (`apertus-mlx download ALIAS` fetches one). Or type one below and press "
        f"Enter.\n\n{table}"
    )


def format_stats(stats) -> str:
    """One line under an answer: what it cost and why it ended."""
    reason = FINISH_LABELS.get(stats.finish_reason, f"stopped: {stats.finish_reason}")
    cached = f" ({stats.cached_tokens} cached)" if stats.cached_tokens else ""
    first = "no token" if stats.ttft_s is None else f"first token {stats.ttft_s:.2f} s"
    return (
        f"{stats.generated_tokens} tokens · {stats.decode_tps:.1f} tok/s · "
        f"{first} · prompt {stats.prompt_tokens} tokens{cached} · "
        f"{reason}"
    )


class UserMessage(Static):
    def __init__(self, text: str) -> None:
        super().__init__(text, markup=False)


class AssistantMessage(Vertical):
    """The answer as Markdown, streamed while it is generated, then a status line."""

    def __init__(self, turn: int) -> None:
        super().__init__()
        self.turn = turn
        self.text = ""
        self.finished = False
        self._stream: MarkdownStream | None = None

    def compose(self) -> ComposeResult:
        yield Markdown(classes="answer")
        yield Static("generating… (Esc stops)", classes="status", markup=False)

    async def append(self, text: str) -> None:
        self.text += text
        if self._stream is None:
            self._stream = Markdown.get_stream(self.query_one(Markdown))
        await self._stream.write(text)

    async def finish(self, status: str, error: bool = False) -> None:
        if self._stream is not None:
            await self._stream.stop()
            self._stream = None
        self.finished = True
        line = self.query_one(".status", Static)
        line.update(status)
        line.set_class(error, "error")
