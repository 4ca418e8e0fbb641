"""The chat app: conversations from the history store on the left, the conversation on the
right, the prompt below, a status bar; a model thread doing the work.

State flows one way: the UI sends jobs to `ModelWorker` and reacts to the messages it posts
back; nothing here touches MLX. Every message goes to the store first, so nothing typed or
answered is lost; the screen is redrawn from the store when the conversation changes.
"""

from __future__ import annotations

from collections.abc import Iterable

from textual import on
from textual.app import App, ComposeResult, SystemCommand
from textual.binding import Binding
from textual.containers import Horizontal, Vertical
from textual.reactive import reactive
from textual.screen import Screen
from textual.widgets import Footer, Header

from apertus_mlx.errors import ApertusError

from .conversation import ConversationView, Running
from .screens.dialogs import (
    ConfirmScreen,
    DetailsScreen,
    HelpScreen,
    TextPromptScreen,
    details_text,
)
from .screens.models import ModelsScreen
from .screens.settings import SettingsScreen
from .settings import AppConfig, ChatSettings
from .sidebar import Sidebar
from .widgets import (
    AssistantMessage,
    PromptArea,
    StatusBar,
    code_blocks,
    format_stats,
)
from .worker import (
    AnswerChunk,
    AnswerDone,
    AnswerStarted,
    ModelFailed,
    ModelLoaded,
    ModelLoading,
    ModelWorker,
    Reply,
)


class ChatApp(App):
    """`apertus-mlx chat`: conversations kept in the history, models at hand."""

    TITLE = "apertus-mlx"
    CSS_PATH = "chat.tcss"
    HORIZONTAL_BREAKPOINTS = [(0, "-narrow"), (100, "-wide")]  # a slimmer list below 100 columns
    BINDINGS = [
        Binding("escape", "stop", "Stop"),
        Binding("ctrl+n", "new_conversation", "New"),
        Binding("ctrl+r", "regenerate", "Regenerate"),
        Binding("ctrl+l", "edit_last", "Edit last"),
        Binding("alt+left", "version(-1)", "Older version", show=False),
        Binding("alt+right", "version(1)", "Newer version", show=False),
        Binding("ctrl+o", "models", "Models"),
        Binding("ctrl+s", "settings", "Settings"),
        Binding("ctrl+t", "toggle_thinking", "Deliberation", show=False),
        Binding("ctrl+b", "toggle_sidebar", "Chats", show=False),
        Binding("f1,question_mark", "help", "Help"),
        Binding("f2", "rename", "Rename", show=False),
        Binding("f3,slash", "search", "Search", show=False),
        Binding("f5", "copy_answer", "Copy answer", show=False),
        Binding("f6", "copy_code", "Copy code", show=False),
        Binding("f8", "delete", "Delete chat", show=False),
        Binding("f9", "details", "Details", show=False),
        Binding("ctrl+q", "quit", "Quit", priority=True),
    ]

    generating: reactive[bool] = reactive(False, bindings=True)

    def __init__(self, model: str | None = None, settings: ChatSettings | None = None,
                 store=None) -> None:  # fmt: skip
        super().__init__()
        self.model_name = model  # the model of the next answer
        self.defaults = settings  # for new chats of this run; command-line ones win, unsaved
        self.store = store
        self.config = AppConfig()
        self.conversation = None  # apertus_mlx.store.Conversation shown, None for a new one
        self.running: Running | None = None
        self.editing = None  # the user Message being edited
        self.loaded: str | None = None
        self.context: int | None = None
        self.context_used = 0
        self.tps: float | None = None
        self.activity = ""
        self.worker: ModelWorker | None = None

    # --- layout -------------------------------------------------------------------------
    def compose(self) -> ComposeResult:
        yield Header()
        with Horizontal(id="body"):
            yield Sidebar(id="sidebar")
            with Vertical(id="main"):
                yield ConversationView(id="messages")
                yield PromptArea(id="prompt", soft_wrap=True, show_line_numbers=False)
        yield StatusBar(id="status")
        yield Footer()

    @property
    def messages(self) -> ConversationView:
        return self.query_one("#messages", ConversationView)

    @property
    def prompt(self) -> PromptArea:
        return self.query_one("#prompt", PromptArea)

    @property
    def settings(self) -> ChatSettings:
        """The settings of the conversation shown, else of the next new one."""
        if self.conversation is not None:
            c = self.conversation
            try:
                return ChatSettings.from_dict(
                    {**c.settings, "system": c.system, "thinking": c.thinking}
                )
            except (ApertusError, TypeError):  # saved by another tool or version: not usable
                return self.defaults.with_(system=c.system, thinking=c.thinking)
        return self.defaults

    async def on_mount(self) -> None:
        from apertus_mlx.store import Store

        try:
            self.config = AppConfig.load()
        except ApertusError as e:
            self.notify(f"{e}; starting on defaults", severity="error", timeout=10)
        if self.defaults is None:
            self.defaults = self.config.defaults
        if self.store is None:
            try:
                self.store = Store.open()
            except ApertusError as e:  # the chat still works, for this session only
                self.store = Store.open(":memory:")
                self.notify(f"{e}. This session is not saved.", title="History unavailable",
                            severity="error", timeout=30)  # fmt: skip
        self.worker = ModelWorker(self.post_message, self.store)
        self.remind_filter()
        self.model_name = self.model_name or self.config.last_model
        self.prompt.border_title = "Message (Enter sends, ctrl+j new line)"
        self.prompt.focus()  # typing goes to the message from the first keystroke
        await self.show_conversation(None)
        self.refresh_conversations()
        self.update_status()
        if self.model_name:
            self.load_model(self.model_name)
        else:
            self.open_models(first_start=True)

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
        if self.worker is not None:
            self.worker.shutdown(timeout=2.0)

    def update_status(self) -> None:
        model = self.model_name
        if self.conversation is not None and self.conversation.model:
            model = self.conversation.model
        activity = self.activity
        if self.settings.thinking:
            activity = f"deliberation on · {activity}" if activity else "deliberation on"
        if self.editing is not None:
            activity = "editing your last message: Enter sends it as a new branch, Esc cancels"
        self.query_one(StatusBar).show(model, self.tps, self.context_used, self.context, activity)

    def focus_prompt(self) -> None:
        if isinstance(self.screen, Screen) and self.screen is self.screen_stack[0]:
            self.prompt.focus()

    def error(self, text: str, inline: bool = True) -> None:
        """Show an error where the user looks: a notification, and at the end of the chat."""
        self.notify(text, severity="error", timeout=10)
        if inline:
            self.run_worker(self.messages.note(text, error=True))

    # --- models -------------------------------------------------------------------------
    def load_model(self, name: str) -> None:
        self.model_name = name
        self.worker.load(name)

    def on_model_loading(self, message: ModelLoading) -> None:
        self.activity = f"loading {message.name}…"
        self.update_status()

    def on_model_loaded(self, message: ModelLoaded) -> None:
        self.loaded = message.name
        self.context = message.context
        self.activity = ""
        if self.config.last_model != message.name:  # the next start opens it again
            self.config.last_model = message.name
            self.save_config()
        self.sub_title = message.name
        self.update_status()
        self.focus_prompt()

    def on_model_failed(self, message: ModelFailed) -> None:
        self.loaded = None
        self.activity = ""
        self.update_status()
        self.error(f"Could not load {message.name}: {message.error}")
        self.focus_prompt()

    def open_models(self, first_start: bool = False) -> None:
        current = self.conversation.model if self.conversation else self.model_name
        self.push_screen(ModelsScreen(current, first_start), self.model_chosen)

    def model_chosen(self, repo: str | None) -> None:
        if repo is None:
            self.focus_prompt()
            return
        if self.conversation is not None:
            self.conversation = self.store.update_conversation(self.conversation.id, model=repo)
        self.load_model(repo)
        self.update_status()
        self.focus_prompt()

    def save_config(self) -> None:
        try:
            self.config.save()
        except OSError as e:
            self.error(f"Could not save the settings: {e.strerror or e}", inline=False)

    # --- conversations ------------------------------------------------------------------
    @property
    def sidebar(self) -> Sidebar:
        return self.query_one(Sidebar)

    def refresh_conversations(self) -> None:
        self.sidebar.refill(self.conversation.id if self.conversation else None)

    async def on_sidebar_chosen(self, message: Sidebar.Chosen) -> None:
        await self.show_conversation(message.conversation_id)
        self.prompt.focus()

    async def show_conversation(self, conversation_id: str | None) -> None:
        """Draw a conversation from the store; a running answer in it shows as it streams."""
        self.editing = None
        self.conversation = (
            self.store.get_conversation(conversation_id) if conversation_id else None
        )
        c = self.conversation
        if c is not None and c.model and c.model != self.model_name:
            self.model_name = c.model  # its next answer uses its model
        running = self.running
        if running is not None and (c is None or running.conversation_id != c.id):
            running = None
        await self.messages.show(self.store.branch(c.id) if c else None, running)
        self.context_used = 0
        if self.conversation is not None:
            stats = [m.stats for m in self.store.branch(self.conversation.id) if m.stats]
            if stats:
                last = stats[-1]
                self.context_used = last.get("prompt_tokens", 0) + last.get("generated_tokens", 0)
        self.update_status()

    def answers(self) -> list[AssistantMessage]:
        return self.messages.answers()

    def live_answer(self) -> AssistantMessage | None:
        """The widget of the running answer, if its conversation is the one shown."""
        r = self.running
        if r is None or self.conversation is None or r.conversation_id != self.conversation.id:
            return None
        return self.messages.live_answer(r.message_id)

    # --- sending ------------------------------------------------------------------------
    @on(PromptArea.Submitted)
    async def send(self, event: PromptArea.Submitted) -> None:
        text = event.text.strip()
        if not text:
            return
        if not self.model_name:
            self.notify("Choose a model first (ctrl+o)", severity="warning")
            self.open_models()
            return
        if self.running is not None:
            self.notify("An answer is being generated: wait, or press Esc to stop it.",
                        severity="warning")  # fmt: skip
            return
        try:
            if self.conversation is None:
                s = self.settings
                self.conversation = self.store.create_conversation(
                    model=self.model_name,
                    system=s.system,
                    thinking=s.thinking,
                    settings=s.stored(),
                )
            parent = "leaf" if self.editing is None else self.editing.parent_id
            user = self.store.add_message(self.conversation.id, "user", text, parent)
        except ApertusError as e:
            self.error(str(e))
            return
        self.prompt.clear()
        editing, self.editing = self.editing, None
        if editing is not None:
            self.running = Running(self.conversation.id)
            await self.show_conversation(self.conversation.id)
            self.running = None
        else:
            await self.messages.add_turn(text, user.id)
        self.start_reply(user.id)
        self.refresh_conversations()

    def start_reply(self, user_message_id: int) -> None:
        """Queue the answer to `user_message_id` on the current branch."""
        c = self.conversation
        history = []
        if c.system:
            history.append({"role": "system", "content": c.system})
        for m in self.store.branch(c.id):
            history.append({"role": m.role, "content": m.content, "tokens": m.tokens})
            if m.id == user_message_id:
                break
        self.running = Running(c.id)
        self.generating = True
        self.activity = "generating… (Esc stops)"
        self.update_status()
        model = c.model or self.model_name
        self.worker.reply(Reply(c.id, user_message_id, history, model, self.settings))
        if not self.live_answer():
            self.messages.mount(AssistantMessage())

    async def on_answer_started(self, message: AnswerStarted) -> None:
        r = self.running
        if r is None or r.conversation_id != message.conversation_id:
            return
        answer = self.live_answer()
        r.message_id = message.message_id
        if answer is not None:
            answer.message_id = message.message_id
        if message.dropped:
            note = (
                f"The conversation is longer than the model's window: the oldest "
                f"{message.dropped} messages are left out of this answer's prompt "
                "(the system prompt is kept). Start a new chat (ctrl+n) for a fresh window."
            )
            self.notify(note, severity="warning", timeout=10)
            if self.conversation is not None and self.conversation.id == message.conversation_id:
                await self.messages.note(note, before=answer)

    async def on_answer_chunk(self, message: AnswerChunk) -> None:
        r = self.running
        if r is None or r.message_id != message.message_id:
            return
        r.text += message.text
        answer = self.live_answer()
        if answer is not None:
            await answer.append(message.text)

    async def on_answer_done(self, message: AnswerDone) -> None:
        r = self.running
        if r is None or r.conversation_id != message.conversation_id:
            return
        answer = self.live_answer()
        self.running = None
        self.generating = False
        self.activity = ""
        if message.stats is not None:
            self.tps = message.stats.decode_tps
            self.context_used = message.context_used
        if answer is not None:
            if message.error:
                await answer.finish(f"error: {message.error}", error=True)
                self.error(message.error, inline=False)
            else:
                await answer.finish(format_stats(message.stats))
        elif message.error:
            self.notify(message.error, severity="error")
        if message.store_error and self.conversation_exists(message.conversation_id):
            self.error(f"The answer could not be saved: {message.store_error}")
        if self.conversation is not None and self.conversation.id == message.conversation_id:
            self.conversation = self.store.get_conversation(message.conversation_id)
        self.update_status()
        self.refresh_conversations()

    def conversation_exists(self, conversation_id: str) -> bool:
        try:
            self.store.get_conversation(conversation_id)
        except ApertusError:
            return False  # deleted while its answer was streaming
        return True

    # --- actions ------------------------------------------------------------------------
    def check_action(self, action: str, parameters: tuple[object, ...]) -> bool | None:
        if action not in ("quit", "command_palette") and len(self.screen_stack) > 1:
            return False  # another screen is on top: its own keys, not the chat's
        if action == "stop":
            return self.generating or self.editing is not None or self.focused is not self.prompt
        return True

    def action_stop(self) -> None:
        """Stop the answer (the part already generated stays, on screen and in the history);
        else cancel an edit; else go back to the message box."""
        if self.generating and self.worker is not None:
            self.worker.stop()
        elif self.editing is not None:
            self.editing = None
            self.prompt.clear()
            self.update_status()
        self.prompt.focus()

    async def action_new_conversation(self) -> None:
        await self.show_conversation(None)
        self.refresh_conversations()
        self.prompt.clear()
        self.prompt.focus()

    def last_messages(self):
        """(last user message, last assistant message) of the current branch, or Nones."""
        if self.conversation is None:
            return None, None
        branch = self.store.branch(self.conversation.id)
        users = [m for m in branch if m.role == "user"]
        answers = [m for m in branch if m.role == "assistant"]
        return (users[-1] if users else None), (answers[-1] if answers else None)

    async def action_regenerate(self) -> None:
        """A new answer to the last user message, as a sibling branch of the old one."""
        if self.running is not None:
            self.notify("Wait for the answer, or press Esc to stop it.", severity="warning")
            return
        user, _ = self.last_messages()
        if user is None:
            self.notify("Nothing to regenerate yet", severity="warning")
            return
        self.store.set_current_leaf(self.conversation.id, user.id)
        await self.show_conversation(self.conversation.id)
        self.start_reply(user.id)

    async def action_version(self, step: int) -> None:
        """Show another version of the last answer (or of the message it answers, when the
        answer has none): the branches regenerate and edit left behind."""
        if self.running is not None:
            self.notify("Wait for the answer, or press Esc to stop it.", severity="warning")
            return
        user, answer = self.last_messages()
        for message in (answer, user):
            if message is None:
                continue
            versions = self.store.siblings(message.id)
            if len(versions) < 2:
                continue
            i = [v.id for v in versions].index(message.id)
            target = versions[(i + step) % len(versions)]
            self.store.set_current_leaf(self.conversation.id, self.store.latest_leaf(target.id))
            await self.show_conversation(self.conversation.id)
            what = "answer" if message is answer else "message"
            self.notify(f"{what} version {(i + step) % len(versions) + 1} of {len(versions)}")
            return
        self.notify("Only one version: regenerate (ctrl+r) or edit (ctrl+l) makes more",
                    severity="warning")  # fmt: skip

    def action_edit_last(self) -> None:
        """Put the last user message in the prompt; Enter sends it as a new branch."""
        user, _ = self.last_messages()
        if user is None:
            self.notify("No message to edit yet", severity="warning")
            return
        if self.running is not None:
            self.notify("Wait for the answer, or press Esc to stop it.", severity="warning")
            return
        self.editing = user
        self.prompt.text = user.content
        self.prompt.move_cursor(self.prompt.document.end)
        self.prompt.focus()
        self.update_status()

    def action_models(self) -> None:
        self.open_models()

    def action_settings(self) -> None:
        self.push_screen(SettingsScreen(self.settings, self.conversation is not None),
                         self.settings_chosen)  # fmt: skip

    def settings_chosen(self, result: tuple[ChatSettings, str] | None) -> None:
        if result is not None:
            settings, scope = result
            if scope == "default":
                self.config.defaults = self.defaults = settings
                self.save_config()
                self.notify("Saved as the default for new chats")
            elif self.conversation is not None:
                self.save_chat_settings(settings)
                self.notify("Saved for this chat")
        self.focus_prompt()

    def save_chat_settings(self, s: ChatSettings) -> None:
        self.conversation = self.store.update_conversation(
            self.conversation.id, settings=s.stored(), system=s.system, thinking=s.thinking
        )

    def action_toggle_thinking(self) -> None:
        s = self.settings.with_(thinking=not self.settings.thinking)
        if self.conversation is not None:
            self.save_chat_settings(s)
        else:
            self.config.defaults = self.defaults = s
            self.save_config()
        self.notify(f"Deliberation {'on' if s.thinking else 'off'}")
        self.update_status()

    def action_toggle_sidebar(self) -> None:
        sidebar = self.query_one("#sidebar")
        sidebar.display = not sidebar.display

    def action_help(self) -> None:
        self.push_screen(HelpScreen())

    def action_search(self) -> None:
        self.sidebar.focus_search()

    def action_rename(self) -> None:
        if self.conversation is None:
            self.notify("Send a message first: a new chat has no title yet", severity="warning")
            return

        def renamed(title: str | None) -> None:
            if title:
                self.conversation = self.store.rename(self.conversation.id, title)
                self.refresh_conversations()
            self.focus_prompt()

        self.push_screen(TextPromptScreen("New title:", self.conversation.title or ""), renamed)

    def action_delete(self) -> None:
        c = self.conversation
        if c is None:
            return

        async def confirmed(yes: bool | None) -> None:
            if yes:
                if self.running is not None and self.running.conversation_id == c.id:
                    self.worker.stop()
                self.store.delete(c.id)
                await self.show_conversation(None)
                self.refresh_conversations()
                self.notify(f"Deleted “{c.title or 'untitled'}”")
            self.focus_prompt()

        self.push_screen(ConfirmScreen(f"Delete the conversation “{c.title or 'untitled'}”?"),
                         confirmed)  # fmt: skip

    def action_copy_answer(self) -> None:
        answers = [a for a in self.answers() if a.text]
        if not answers:
            self.notify("No answer to copy yet", severity="warning")
            return
        self.copy_to_clipboard(answers[-1].text)
        self.notify("Answer copied")

    def action_copy_code(self) -> None:
        for answer in reversed(self.answers()):
            blocks = code_blocks(answer.text)
            if blocks:
                self.copy_to_clipboard(blocks[-1])
                self.notify("Code block copied")
                return
        self.notify("No code block in this conversation", severity="warning")

    def action_details(self, message_id: int | None = None) -> None:
        if message_id is None:
            _, answer = self.last_messages()
            if answer is None:
                self.notify("No answer yet", severity="warning")
                return
            message_id = answer.id
        self.push_screen(DetailsScreen(details_text(self.store.message(message_id))))

    def get_system_commands(self, screen: Screen) -> Iterable[SystemCommand]:
        yield from super().get_system_commands(screen)
        commands = [
            ("Stop answer", "Stop generating; the part generated stays (Esc)", self.action_stop),
            ("New conversation", "Start a new chat (ctrl+n)", self.action_new_conversation),
            ("Regenerate", "A new answer to the last message (ctrl+r)", self.action_regenerate),
            ("Edit last message", "Change and resend it, as a branch (ctrl+l)",
             self.action_edit_last),
            ("Older version", "The last answer's previous version, from regenerate or edit "
             "(alt+left)", lambda: self.run_worker(self.action_version(-1))),
            ("Newer version", "The last answer's next version (alt+right)",
             lambda: self.run_worker(self.action_version(1))),
            ("Models", "Download, delete or choose a model (ctrl+o)", self.action_models),
            ("Settings", "Sampling, max tokens, seed, system prompt (ctrl+s)",
             self.action_settings),
            ("Deliberation on/off", "The model's thinking mode (ctrl+t)",
             self.action_toggle_thinking),
            ("Rename conversation", "Give this chat a title (F2)", self.action_rename),
            ("Delete conversation", "Delete this chat, after asking (F8)", self.action_delete),
            ("Search history", "Full-text search of every chat (F3)", self.action_search),
            ("Copy last answer", "To the clipboard (F5)", self.action_copy_answer),
            ("Copy last code block", "To the clipboard (F6)", self.action_copy_code),
            ("Answer details", "Model, revision, settings, seed, speed (F9)",
             self.action_details),
            ("Show/hide conversations", "The list on the left (ctrl+b)",
             self.action_toggle_sidebar),
            ("Keys", "Every key binding (F1)", self.action_help),
        ]  # fmt: skip
        for title, help_text, callback in commands:
            yield SystemCommand(title, help_text, callback)
