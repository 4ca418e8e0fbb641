"""Small modal screens: confirm, ask for a line of text, key help, an answer's details."""

from __future__ import annotations

from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical, VerticalScroll
from textual.screen import ModalScreen
from textual.widgets import Button, Footer, Input, Label, Static

# Shown in every dialog's footer: Textual's own focus chain, named (its screen bindings are
# hidden by default). Nothing of ours handles Tab.
FOCUS_KEYS = [
    Binding("tab", "app.focus_next", "Next", show=True),
    Binding("shift+tab", "app.focus_previous", "Previous", show=False),
]

KEYS: list[tuple[str, str]] = [
    ("Enter", "send the message"),
    ("ctrl+j", "new line in the message (also shift+enter where the terminal reports it)"),
    ("Esc", "stop the answer (its text so far stays); cancel an edit; back to typing"),
    ("ctrl+c", "stop the answer; pressed again, quit"),
    ("ctrl+n", "new conversation"),
    ("ctrl+r", "regenerate the last answer (a new branch)"),
    ("ctrl+l", "edit the last message (sent as a new branch)"),
    ("alt+←/→", "older/newer version of the last exchange (regenerations and edits)"),
    ("ctrl+o", "models: download, delete, choose"),
    ("ctrl+s", "settings of this conversation, or the defaults"),
    ("ctrl+t", "deliberation (thinking) on/off"),
    ("F2", "rename the conversation"),
    ("F3 or /", "search the history"),
    ("F5", "copy the last answer"),
    ("F6", "copy the last code block"),
    ("F8", "delete the conversation"),
    ("F9", "details of the last answer (click an answer's status line for its own)"),
    ("ctrl+b", "show or hide the conversation list"),
    ("ctrl+p", "command palette: every action"),
    ("F1 or ?", "this help"),
    ("ctrl+q", "quit"),
    ("click", "a message copies it"),
]


def key_table(rows: list[tuple[str, str]]) -> str:
    """Two aligned columns of plain text."""
    width = max(len(k) for k, _ in rows) + 2
    return "\n".join(f"{k:<{width}}{v}" for k, v in rows)


class ConfirmScreen(ModalScreen[bool]):
    """Yes or no; Esc and n are no, y is yes; Tab moves between the buttons, Enter presses."""

    BINDINGS = [
        Binding("y", "dismiss(True)", "Yes"),
        Binding("n,escape", "dismiss(False)", "No"),
        *FOCUS_KEYS,
    ]

    def __init__(self, question: str, yes: str = "Delete") -> None:
        super().__init__()
        self.question = question
        self.yes = yes

    def compose(self) -> ComposeResult:
        with VerticalScroll(classes="dialog", can_focus=False):
            yield Static(self.question, markup=False, classes="question")
            with Horizontal(classes="buttons"):
                yield Button(f"{self.yes} (y)", variant="error", id="yes")
                yield Button("Cancel (n)", id="no")
        yield Footer()

    def on_mount(self) -> None:
        self.query_one("#no", Button).focus()

    def on_button_pressed(self, event: Button.Pressed) -> None:
        self.dismiss(event.button.id == "yes")


class TextPromptScreen(ModalScreen[str | None]):
    """One line of text (e.g. a new title); Esc cancels."""

    BINDINGS = [Binding("escape", "dismiss(None)", "Cancel"), *FOCUS_KEYS]
    AUTO_FOCUS = "#answer"

    def __init__(self, question: str, value: str = "") -> None:
        super().__init__()
        self.question = question
        self.value = value

    def compose(self) -> ComposeResult:
        with Vertical(classes="dialog"):
            yield Label(self.question, markup=False)
            yield Input(self.value, id="answer")
            yield Static("Enter saves, Esc cancels", classes="hint")
        yield Footer()

    def on_input_submitted(self, event: Input.Submitted) -> None:
        self.dismiss(event.value.strip() or None)


class HelpScreen(ModalScreen[None]):
    BINDINGS = [Binding("escape,f1,q,question_mark", "dismiss(None)", "Close")]

    def compose(self) -> ComposeResult:
        with VerticalScroll(classes="dialog wide"):
            yield Label("Keys", classes="title")
            yield Static(key_table(KEYS), classes="keys", markup=False)
        yield Footer()


class DetailsScreen(ModalScreen[None]):
    """What produced an answer: model and revision, settings, seed, speed, finish reason."""

    BINDINGS = [Binding("escape,q,f9", "dismiss(None)", "Close")]

    def __init__(self, text: str) -> None:
        super().__init__()
        self.text = text

    def compose(self) -> ComposeResult:
        with VerticalScroll(classes="dialog wide"):
            yield Static(self.text, id="details", markup=False)
        yield Footer()


def details_text(message) -> str:
    """The text of DetailsScreen, from a store Message."""
    s = dict(message.settings or {})
    stats = message.stats or {}
    rows = [
        ("model", s.pop("model", None) or "?"),
        ("revision", s.pop("revision", None) or "local directory / unknown"),
        ("seed", "random" if message.seed is None else message.seed),
        ("finish reason", message.finish_reason or "unfinished"),
    ]
    for key in ("temperature", "top_p", "top_k", "min_p", "repetition_penalty", "max_tokens"):
        if key in s:
            rows.append((key.replace("_", " "), s[key]))
    rows.append(("deliberation", "on" if s.get("thinking") else "off"))
    for key, label in (("prompt_tokens", "prompt tokens"), ("cached_tokens", "cached tokens"),
                       ("generated_tokens", "answer tokens")):  # fmt: skip
        if key in stats:
            rows.append((label, stats[key]))
    if "decode_tps" in stats:
        rows.append(("tokens/s", f"{stats['decode_tps']:.1f}"))
    if "ttft_s" in stats:
        rows.append(("first token", f"{stats['ttft_s']:.2f} s"))
    from datetime import datetime

    when = datetime.fromtimestamp(message.created_at).strftime("%Y-%m-%d %H:%M")
    return f"Answer of {when}\n\n" + key_table([(k, str(v)) for k, v in rows])
