"""`apertus-mlx chat`: the app around the chat screen.

The app opens what the chat needs (its config, the history store, the model thread), then
shows `ChatScreen`, which does the chatting; the app keeps only what is app-wide: the config
file, the reminder about the output filter, the command palette, quitting.
"""

from __future__ import annotations

from collections.abc import Iterable

from textual.app import App, SystemCommand
from textual.binding import Binding
from textual.screen import Screen

from apertus_mlx.errors import ApertusError

from .chat_screen import ChatScreen
from .downloads import DownloadFinished, DownloadProgress, Downloads
from .settings import AppConfig, ChatSettings
from .widgets import warm_markdown
from .worker import ModelWorker


class ChatApp(App):
    """Conversations kept in the history, models at hand."""

    TITLE = "apertus-mlx"
    CSS_PATH = "chat.tcss"
    HORIZONTAL_BREAKPOINTS = [(0, "-narrow"), (100, "-wide")]  # a slimmer list below 100 columns
    BINDINGS = [Binding("ctrl+q", "quit", "Quit", priority=True)]

    def __init__(self, model: str | None = None, settings: ChatSettings | None = None,
                 store=None) -> None:  # fmt: skip
        super().__init__()
        self.model_name = model
        self.defaults = settings  # for new chats of this run; command-line ones win, unsaved
        self.store = store
        self.config = AppConfig()
        self.worker: ModelWorker | None = None
        self.chat: ChatScreen | None = None
        self.downloads = Downloads(self.post_message)

    async def on_mount(self) -> None:
        from apertus_mlx.store import Store

        try:
            self.config = AppConfig.load()
        except ApertusError as e:
            self.notify(f"{e}; starting on defaults", severity="error", timeout=10)
        if self.store is None:
            try:
                self.store = Store.open()
            except ApertusError as e:  # the chat still works, for this session only
                self.store = Store.open(":memory:")
                self.notify(f"{e}. This session is not saved.", title="History unavailable",
                            severity="error", timeout=30)  # fmt: skip
        model, resume = self.model_name, None
        if model is None and self.config.last_model:
            # the last model is gone or was never whole (a first start stopped mid-download):
            # the models screen, on it, not an error in an empty chat
            from apertus_mlx.hub import is_ready

            model = self.config.last_model
            if not is_ready(model):
                model, resume = None, model
        self.chat = ChatScreen(self.store, self.defaults or self.config.defaults, model,
                               resume=resume)  # fmt: skip
        self.worker = ModelWorker(self.chat.post_message, self.store)
        await self.push_screen(self.chat)
        self.run_worker(warm_markdown, thread=True, exit_on_error=False)
        self.remind_filter()

    def remind_filter(self) -> None:
        """Once per run: no output filter installed, or one past six months old."""
        from apertus_mlx.output_filter import reminder

        try:
            note = reminder()
        except Exception:  # noqa: BLE001 - a reminder never stops the app
            note = None
        if note:
            self.notify(note, title="Output filter", severity="warning", timeout=15)

    def on_unmount(self) -> None:
        self.downloads.shutdown()
        if self.worker is not None:
            self.worker.shutdown(timeout=2.0)

    # --- downloads: they outlive the models screen -------------------------------------
    def _models_screens(self):
        from .screens.models import ModelsScreen

        return [s for s in self.screen_stack if isinstance(s, ModelsScreen)]

    def on_download_progress(self, message: DownloadProgress) -> None:
        self.downloads.progress(message)
        for screen in self._models_screens():
            screen.download_progress(message)
        if self.chat is not None:
            self.chat.update_status()

    def on_download_finished(self, message: DownloadFinished) -> None:
        self.downloads.finished(message)
        screens = self._models_screens()
        for screen in screens:
            screen.download_finished(message)
        if self.chat is not None:
            self.chat.update_status()
            if not screens:  # finished in the background, while the user chats
                self.chat.download_done(message)

    # --- the config file ----------------------------------------------------------------
    def remember_model(self, name: str) -> None:
        """The next start opens this model again."""
        if self.config.last_model != name:
            self.config.last_model = name
            self.save_config()

    def save_defaults(self, settings: ChatSettings) -> None:
        self.config.defaults = self.defaults = settings
        self.save_config()

    def save_preset(self, name: str, settings: ChatSettings) -> None:
        self.config.presets[name] = settings
        self.save_config()

    def delete_preset(self, name: str) -> None:
        self.config.presets.pop(name, None)
        self.config.model_presets = {m: p for m, p in self.config.model_presets.items()
                                     if p != name}  # fmt: skip
        self.save_config()

    def set_model_preset(self, model: str, name: str | None) -> None:
        """New chats on `model` start from preset `name` (None: from the defaults)."""
        if name is None:
            self.config.model_presets.pop(model, None)
        else:
            self.config.model_presets[model] = name
        self.save_config()

    def save_config(self) -> None:
        try:
            self.config.save()
        except OSError as e:
            self.notify(f"Could not save the settings: {e.strerror or e}", severity="error",
                        timeout=10)  # fmt: skip

    # --- the command palette ------------------------------------------------------------
    def get_system_commands(self, screen: Screen) -> Iterable[SystemCommand]:
        yield from super().get_system_commands(screen)
        chat = self.chat
        if chat is None:
            return
        commands = [
            ("Stop answer", "Stop generating; the part generated stays (Esc)", chat.action_stop),
            ("New conversation", "Start a new chat (ctrl+n)", chat.action_new_conversation),
            ("Regenerate", "A new answer to the last message (ctrl+r)", chat.action_regenerate),
            ("Edit last message", "Change and resend it, as a branch (ctrl+l)",
             chat.action_edit_last),
            ("Older version", "The last answer's previous version, from regenerate or edit "
             "(alt+left)", lambda: chat.run_worker(chat.action_version(-1))),
            ("Newer version", "The last answer's next version (alt+right)",
             lambda: chat.run_worker(chat.action_version(1))),
            ("Models", "Download, delete or choose a model (ctrl+o)", chat.action_models),
            ("Settings", "Sampling, max tokens, seed, system prompt (ctrl+s)",
             chat.action_settings),
            ("Deliberation on/off", "The model's thinking mode (ctrl+t)",
             chat.action_toggle_thinking),
            ("Rename conversation", "Give this chat a title (F2)", chat.action_rename),
            ("Delete conversation", "Delete this chat, after asking (F8)", chat.action_delete),
            ("Search history", "Full-text search of every chat (F3)", chat.action_search),
            ("Copy last answer", "To the clipboard (F5)", chat.action_copy_answer),
            ("Copy last code block", "To the clipboard (F6)", chat.action_copy_code),
            ("Answer details", "Model, revision, settings, seed, speed (F9)",
             chat.action_details),
            ("Show/hide conversations", "The list on the left (ctrl+b)",
             chat.action_toggle_sidebar),
            ("Keys", "Every key binding (F1)", chat.action_help),
        ]  # fmt: skip
        for title, help_text, callback in commands:
            yield SystemCommand(title, help_text, callback)
