"""The settings form: sampling, max tokens, seed, system prompt and deliberation.

It edits one ChatSettings and hands it back with where to keep it: this conversation, or the
defaults of new ones. A value out of range is refused here, with the reason under the form;
nothing is returned until every field is valid.
"""

from __future__ import annotations

from textual import on
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, VerticalScroll
from textual.screen import ModalScreen
from textual.widgets import Button, Footer, Input, Label, Select, Static, Switch, TextArea

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

    def __init__(self, settings: ChatSettings, has_chat: bool, model: str | None = None) -> None:
        super().__init__()
        self.settings = settings
        self.has_chat = has_chat
        self.model = model  # whose default preset the "default for this model" button sets

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
            yield Label("Presets: named settings to reuse (choosing one fills the form)",
                        classes="title")  # fmt: skip
            with Horizontal(classes="field"):
                yield Select(self.preset_options(), prompt="choose a preset", id="preset")
                yield Input(placeholder="name to save the form as", id="preset-name")
            with Horizontal(classes="buttons"):
                yield Button("Save as preset", id="save-preset")
                yield Button("Delete preset", id="delete-preset")
                yield Button("Default for this model", id="model-preset",
                             disabled=self.model is None)  # fmt: skip
            yield Static(self.model_preset_line(), id="model-preset-line", markup=False)
        yield Footer()

    # --- presets: kept in the app's config at once ---------------------------------------
    def preset_options(self) -> list[tuple[str, str]]:
        return [(name, name) for name in sorted(self.app.config.presets)]

    def model_preset_line(self) -> str:
        if self.model is None:
            return ""
        name = self.app.config.model_presets.get(self.model)
        who = self.model.rsplit("/", 1)[-1]
        return f"New chats on {who} start from preset “{name}”" if name else ""

    def presets_changed(self, selected: str | None) -> None:
        select = self.query_one("#preset", Select)
        select.set_options(self.preset_options())
        if selected is not None and selected in self.app.config.presets:
            select.value = selected
        self.query_one("#model-preset-line", Static).update(self.model_preset_line())

    @on(Select.Changed, "#preset")
    def preset_chosen(self, event: Select.Changed) -> None:
        if not isinstance(event.value, str) or event.value not in self.app.config.presets:
            return
        p = self.app.config.presets[event.value]
        for name in FIELDS:
            self.query_one(f"#{name}", Input).value = form_text(getattr(p, name))
        self.query_one("#thinking", Switch).value = p.thinking
        self.query_one("#system", TextArea).text = p.system or ""
        self.query_one("#preset-name", Input).value = str(event.value)

    def selected_preset(self) -> str | None:
        value = self.query_one("#preset", Select).value
        return value if isinstance(value, str) else None  # Select.NULL: none chosen

    def preset_button(self, which: str) -> None:
        if which == "save-preset":
            name = self.query_one("#preset-name", Input).value.strip() or self.selected_preset()
            if not name:
                self.error("Give the preset a name first")
                return
            try:
                settings = self.read()
            except UsageError as e:
                self.error(f"Not saved: {e}")
                return
            self.app.save_preset(name, settings)
            self.presets_changed(name)
            self.notify(f"Preset “{name}” saved")
        elif which == "delete-preset":
            name = self.selected_preset()
            if name is None:
                self.error("Choose the preset to delete first")
                return
            self.app.delete_preset(name)
            self.presets_changed(None)
            self.notify(f"Preset “{name}” deleted")
        elif which == "model-preset" and self.model is not None:
            name = self.selected_preset()
            self.app.set_model_preset(self.model, name)
            self.presets_changed(name)
            self.notify(f"New chats on this model start from “{name}”" if name
                        else "New chats on this model start from the defaults")  # fmt: skip

    def error(self, text: str) -> None:
        line = self.query_one("#settings-error", Static)
        line.update(text)
        line.scroll_visible(animate=False)

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
        if event.button.id in ("save-preset", "delete-preset", "model-preset"):
            self.preset_button(event.button.id)
            return
        self.save(event.button.id or "default")

    def on_input_submitted(self, event: Input.Submitted) -> None:
        if event.input.id == "preset-name":
            self.preset_button("save-preset")
            return
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
