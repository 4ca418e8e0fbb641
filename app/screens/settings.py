"""The settings form: sampling, max tokens, seed, system prompt and deliberation.

It edits one ChatSettings and hands it back with where to keep it: this conversation, or the
defaults of new ones. A value out of range is refused here, with the reason under the form;
nothing is returned until every field is valid.
"""

from __future__ import annotations

from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, VerticalScroll
from textual.screen import ModalScreen
from textual.widgets import Button, Footer, Input, Label, Static, Switch, TextArea

from apertus_mlx.errors import UsageError

from ..settings import FIELDS, PLACEHOLDERS, ChatSettings, form_text, parse_form
from .dialogs import FOCUS_KEYS


class SettingsScreen(ModalScreen[tuple[ChatSettings, str] | None]):
    """Dismisses with (settings, "chat" | "next" | "default"), or None when cancelled.
    "next": a new chat's own settings, for its first message (not saved as the default).
    Tab and shift+Tab walk the fields and buttons (Textual's focus chain); Enter in a field
    saves for this chat (a new chat: as the default), Enter on a button presses it; the form
    scrolls when it is taller than the terminal."""

    BINDINGS = [Binding("escape", "dismiss(None)", "Cancel"), *FOCUS_KEYS]

    def __init__(self, settings: ChatSettings, has_chat: bool) -> None:
        super().__init__()
        self.settings = settings
        self.has_chat = has_chat

    def compose(self) -> ComposeResult:
        s = self.settings
        with VerticalScroll(classes="dialog wide", id="settings", can_focus=False):
            yield Label("Settings (empty = the checkpoint's default)", classes="title")
            yield Static("", id="settings-error", classes="error")
            for name, (label, _) in FIELDS.items():
                with Horizontal(classes="field"):
                    yield Label(label, classes="label")
                    yield Input(form_text(getattr(s, name)), id=name,
                                placeholder=PLACEHOLDERS[name])  # fmt: skip
            with Horizontal(classes="field"):
                yield Label("Deliberation (thinking)", classes="label")
                yield Switch(s.thinking, id="thinking")
            yield Label("System prompt (empty = the model's own)")
            yield TextArea(s.system or "", id="system")
            with Horizontal(classes="buttons"):
                if self.has_chat:
                    yield Button("Save for this chat", variant="primary", id="chat")
                else:
                    yield Button("Use for this new chat", variant="primary", id="next")
                yield Button("Save as default", id="default")
                yield Button("Cancel", id="cancel")
        yield Footer()

    def on_mount(self) -> None:
        self.query_one("#temperature", Input).focus()

    def read(self) -> ChatSettings:
        values = {name: self.query_one(f"#{name}", Input).value for name in FIELDS}
        system = self.query_one("#system", TextArea).text
        return parse_form(values, system, self.query_one("#thinking", Switch).value, self.settings)

    def on_button_pressed(self, event: Button.Pressed) -> None:
        if event.button.id == "cancel":
            self.dismiss(None)
            return
        self.save(event.button.id or "default")

    def on_input_submitted(self) -> None:
        self.save("chat" if self.has_chat else "default")

    def save(self, scope: str) -> None:
        try:
            settings = self.read()
        except UsageError as e:
            line = self.query_one("#settings-error", Static)
            line.update(f"Not saved: {e}")
            line.scroll_visible(animate=False)
            return
        self.dismiss((settings, scope))
