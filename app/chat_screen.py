"""The chat screen: conversations from the history store on the left, the conversation on the
right, the message box below, a status bar.

State flows one way: the screen asks the model thread (`ModelWorker`) for turns and reacts to
the messages it posts back; nothing here touches MLX. What is shown lives in a small
controller (`ChatController`): the conversation, the answer running (one state), the message
being edited, and the one guarded way to the store. The screen is redrawn from the store when
the conversation changes, so the store stays the one truth.
"""

from __future__ import annotations

from textual import events, on
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical
from textual.reactive import reactive
from textual.screen import Screen
from textual.widgets import Footer, Header

from .controller import ChatController, Running
from .conversation import ConversationView
from .screens.dialogs import (
    ConfirmScreen,
    DetailsScreen,
    HelpScreen,
    TextPromptScreen,
    details_text,
)
from .screens.models import ModelsScreen
from .screens.settings import SettingsScreen
from .settings import ChatSettings
from .sidebar import Sidebar
from .widgets import AssistantMessage, PromptArea, StatusBar, code_blocks, format_stats
from .worker import (
    AnswerChunk,
    AnswerDone,
    AnswerThought,
    ModelFailed,
    ModelLoaded,
    ModelLoading,
    TurnNote,
    TurnRefused,
    TurnStarted,
)


class ChatScreen(Screen):
    BINDINGS = [
        Binding("escape", "stop", "Stop"),
        # ctrl+c stops a running answer (as in a shell); once stopped, ctrl+c again quits
        Binding("ctrl+c", "interrupt", "Stop", show=False, priority=True),
        Binding("ctrl+n", "new_conversation", "New"),
        Binding("ctrl+r", "regenerate", "Regenerate"),
        Binding("ctrl+l", "edit_last", "Edit"),
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
    ]

    generating: reactive[bool] = reactive(False, bindings=True)

    def __init__(self, store, defaults: ChatSettings, model: str | None,
                 resume: str | None = None) -> None:  # fmt: skip
        super().__init__()
        self.resume = resume  # a model not (fully) downloaded: the models screen offers it
        self.chat = ChatController(
            store, defaults, error=lambda text: self.error(text, inline=False),
            lost=self.conversation_lost,
        )  # fmt: skip
        self.model_name = model  # the model of the next answer
        self.loaded: str | None = None
        self.context: int | None = None
        self.context_used = 0
        self.tps: float | None = None
        self.activity = ""
        self.interrupted = False  # ctrl+c stopped an answer: the next ctrl+c quits
        self.dropped_noted: dict[str, int] = {}  # conversation -> messages left out, told

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
    def sidebar(self) -> Sidebar:
        return self.query_one(Sidebar)

    @property
    def worker(self):
        return self.app.worker

    @property
    def running(self) -> Running | None:
        return self.chat.running

    @property
    def conversation(self):
        return self.chat.conversation

    @property
    def settings(self) -> ChatSettings:
        return self.chat.settings

    def on_resize(self, event: events.Resize) -> None:
        # below 100 columns the keys' labels sit closer, so the last of them (Quit) still shows
        self.query_one(Footer).compact = event.size.width < 100

    async def on_mount(self) -> None:
        self.prompt.border_title = "Message (Enter sends, ctrl+j new line)"
        self.prompt.focus()  # typing goes to the message from the first keystroke
        await self.show_conversation(None)
        self.refresh_conversations()
        self.update_status()
        if self.model_name:
            self.load_model(self.model_name)
        else:
            self.open_models(first_start=True)

    def update_status(self) -> None:
        model = self.model_name
        if self.conversation is not None and self.conversation.model:
            model = self.conversation.model
        activity = self.activity
        if self.settings.thinking:
            activity = f"deliberation on · {activity}" if activity else "deliberation on"
        if self.chat.editing is not None:
            activity = "editing your last message: Enter sends it as a new branch, Esc cancels"
        self.query_one(StatusBar).show(model, self.tps, self.context_used, self.context, activity,
                                       self.app.downloads.status())  # fmt: skip

    def focus_prompt(self) -> None:
        if self.app.screen is self:
            self.prompt.focus()

    def error(self, text: str, inline: bool = True) -> None:
        """Show an error where the user looks: a notification, and at the end of the chat."""
        self.notify(text, severity="error", timeout=10)
        if inline:
            self.run_worker(self.messages.note(text, error=True))

    def conversation_lost(self) -> None:
        """The conversation shown was deleted elsewhere: show a new chat instead."""
        self.run_worker(self.show_conversation(None))
        self.refresh_conversations()

    # --- models -------------------------------------------------------------------------
    def load_model(self, name: str) -> None:
        self.model_name = name
        self.worker.load(name)

    def on_model_loading(self, message: ModelLoading) -> None:
        self.activity = f"loading {message.name}…"
        self.update_status()

    def on_model_loaded(self, message: ModelLoaded) -> None:
        self.loaded = message.name
        if self.app.defaults is None:  # no settings from the command line: new chats on this
            self.chat.defaults = self.app.config.for_model(message.name)  # model, its preset
        self.context = message.context
        self.activity = ""
        self.app.remember_model(message.name)
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
        self.app.push_screen(ModelsScreen(current or self.resume, first_start),
                             self.model_chosen)  # fmt: skip

    def download_done(self, message) -> None:
        """A download ended while the chat was shown: say so; a chat without a model (a
        first start left during its download) takes the model at once."""
        if message.error:
            if not message.cancelled:
                self.notify(f"{message.repo}: {message.error}", severity="error", timeout=10)
            return
        if self.model_name is None:
            self.model_chosen(message.repo)
            self.notify(f"{message.repo} downloaded; the chat uses it")
        else:
            self.notify(f"{message.repo} downloaded: ctrl+o chooses it")

    def model_chosen(self, repo: str | None) -> None:
        if repo is None:
            self.update_status()  # a download started there shows here
            self.focus_prompt()
            return
        self.resume = None
        if self.conversation is not None:
            updated = self.chat.call(self.chat.store.update_conversation, self.conversation.id,
                                     model=repo)  # fmt: skip
            self.chat.conversation = updated or self.chat.conversation
        self.load_model(repo)
        self.update_status()
        self.focus_prompt()

    # --- conversations ------------------------------------------------------------------
    def refresh_conversations(self) -> None:
        self.chat.call(self.sidebar.refill, self.conversation.id if self.conversation else None)

    async def on_sidebar_chosen(self, message: Sidebar.Chosen) -> None:
        await self.show_conversation(message.conversation_id)
        self.refresh_conversations()  # the open chat's mark moves with it
        self.prompt.focus()

    async def show_conversation(self, conversation_id: str | None) -> None:
        """Draw a conversation from the store; a running answer in it shows as it streams."""
        if not self.chat.open(conversation_id):
            return  # gone: the controller said so and shows a new chat
        c = self.conversation
        if c is not None and c.model and c.model != self.model_name:
            self.model_name = c.model  # its next answer uses its model
        running = self.running
        if running is not None and (c is None or running.conversation_id != c.id):
            running = None
        branch = self.chat.branch() if c else None
        await self.messages.show(branch, running)
        found = self.versions() if c is not None and running is None else None
        answers = self.messages.answers()
        if found is not None and answers:
            targets, i = found
            answers[-1].set_version(f"version {i + 1}/{len(targets)} (alt+←/→)")
        self.context_used = 0
        stats = [m.stats for m in branch or () if m.stats]
        if stats:
            self.context_used = stats[-1].get("prompt_tokens", 0) + stats[-1].get(
                "generated_tokens", 0
            )
        self.update_status()

    def live_answer(self) -> AssistantMessage | None:
        """The widget of the running answer, if its conversation is the one shown."""
        r = self.running
        if r is None or self.conversation is None or r.conversation_id != self.conversation.id:
            return None
        return self.messages.live_answer(r.message_id)

    # --- turns --------------------------------------------------------------------------
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
        request = self.chat.send(text)
        self.prompt.clear()
        edited, self.chat.editing = self.chat.editing, None
        if edited is not None:  # the new branch forks before the edited message
            branch = self.chat.branch()
            await self.messages.show([m for m in branch[: branch.index(edited)]])
        self.start_turn(request, text)
        await self.messages.add_turn(text, None)
        self.update_status()

    def start_turn(self, request, question: str = "") -> None:
        c = self.conversation
        model = (c.model if c is not None else None) or self.model_name
        job = self.worker.turn(request, model)
        self.interrupted = False
        self.chat.running = Running(job, c.id if c is not None else None, question=question)
        self.chunks, self.first_chunk = 0, None  # live tok/s while it streams
        self.generating = True
        self.activity = "generating… (Esc stops)"
        self.update_status()

    def _mine(self, message) -> Running | None:
        r = self.running
        return r if r is not None and r.job == message.job else None

    async def on_turn_started(self, message: TurnStarted) -> None:
        r = self._mine(message)
        if r is None:
            return
        shown_new = r.conversation_id is None and self.conversation is None
        r.conversation_id, r.message_id = message.conversation_id, message.message_id
        if shown_new:  # the new chat's rows exist now: it is that conversation
            self.chat.open(message.conversation_id)
            self.refresh_conversations()
        answer = self.live_answer()
        if answer is not None:
            answer.message_id = message.message_id
        user = self.messages.pending_user()
        if user is not None:
            user.message_id = message.user_message_id
        told = self.dropped_noted.get(message.conversation_id)
        self.dropped_noted[message.conversation_id] = message.dropped
        if message.dropped and message.dropped != told:  # once, and again when it grows
            note = (
                f"The conversation is longer than the model's window: the oldest "
                f"{message.dropped} messages are left out of this answer's prompt "
                "(the system prompt is kept). Start a new chat (ctrl+n) for a fresh window."
            )
            self.notify(note, severity="warning", timeout=10)
            if answer is not None:
                await self.messages.note(note, before=answer)

    async def on_turn_refused(self, message: TurnRefused) -> None:
        """Nothing was written: the question goes back into the message box."""
        r = self._mine(message)
        if r is None:
            return
        self.end_running()
        if r.question and not self.prompt.text.strip():
            self.prompt.text = r.question
        self.error(message.error, inline=False)
        await self.show_conversation(self.conversation.id if self.conversation else None)

    async def on_answer_chunk(self, message: AnswerChunk) -> None:
        r = self._mine(message)
        if r is None:
            return
        r.text += message.text
        self.live_speed(message.tokens)
        answer = self.live_answer()
        if answer is not None:
            await answer.append(message.text)

    async def on_answer_thought(self, message: AnswerThought) -> None:
        r = self._mine(message)
        if r is None:
            return
        r.thoughts += message.text
        answer = self.live_answer()
        if answer is not None:
            await answer.think(message.text)

    def live_speed(self, chunks: int = 1) -> None:
        """tok/s while the answer streams (a chunk is about a token), twice a second."""
        import time

        now = time.monotonic()
        if self.first_chunk is None:  # the rate counts the chunks after the first message
            self.first_chunk, self.shown_at = now, now
            return
        self.chunks += chunks
        if now - self.shown_at >= 0.5 and self.chunks > 0:
            self.tps = self.chunks / (now - self.first_chunk)
            self.shown_at = now
            self.update_status()

    def on_turn_note(self, message: TurnNote) -> None:
        if self._mine(message) is not None:
            self.notify(message.text, severity="warning", timeout=10)

    async def on_answer_done(self, message: AnswerDone) -> None:
        r = self._mine(message)
        if r is None:
            return
        answer = self.live_answer()
        self.end_running()
        if message.stats is not None:
            # one token has no rate: "–", not "0.0 tok/s"
            enough = message.stats.generated_tokens > 1
            self.tps = message.stats.decode_tps if enough else None
            self.context_used = message.context_used
        if answer is not None:
            if message.error:
                await answer.finish(f"error: {message.error}", error=True)
                self.error(message.error, inline=False)
            else:
                await answer.finish(format_stats(message.stats, self.context))
                if self.conversation is not None and self.conversation.id == r.conversation_id:
                    found = self.versions()  # a regenerated or edited answer: "version 2/2"
                    if found is not None:
                        targets, i = found
                        answer.set_version(f"version {i + 1}/{len(targets)} (alt+←/→)")
        elif message.error:
            self.notify(message.error, severity="error")
        if message.store_error and not message.deleted:
            self.error(f"The answer could not be saved: {message.store_error}")
        if self.conversation is not None and self.conversation.id == r.conversation_id:
            if message.deleted:
                await self.show_conversation(None)
            else:
                self.chat.refresh()
        self.update_status()
        self.refresh_conversations()

    def end_running(self) -> None:
        self.chat.running = None
        self.generating = False
        self.activity = ""

    # --- actions ------------------------------------------------------------------------
    def check_action(self, action: str, parameters: tuple[object, ...]) -> bool | None:
        if action == "stop":  # the search box has its own Esc (clear the search)
            search = self.focused is not None and self.focused.id == "search"
            return (
                self.generating
                or self.chat.editing is not None
                or (self.focused is not self.prompt and not search)
            )
        if action == "interrupt":  # otherwise ctrl+c is the focused widget's (copy)
            return self.generating or self.interrupted
        return True

    def action_interrupt(self) -> None:
        if self.generating:
            self.worker.stop()
            self.interrupted = True
            self.notify("Stopped. ctrl+c again (or ctrl+q) quits.")
        else:
            self.app.exit()

    def action_stop(self) -> None:
        """Stop the answer (the part already generated stays, on screen and in the history);
        else cancel an edit; else go back to the message box."""
        if self.generating:
            self.worker.stop()
        elif self.chat.editing is not None:
            self.chat.editing = None
            self.prompt.clear()
            self.update_status()
        self.prompt.focus()

    async def action_new_conversation(self) -> None:
        self.tps = None  # the last chat's speed is not this one's
        await self.show_conversation(None)
        self.refresh_conversations()
        self.prompt.clear()
        self.prompt.focus()

    def busy(self) -> bool:
        if self.running is not None:
            self.notify("Wait for the answer, or press Esc to stop it.", severity="warning")
            return True
        return False

    async def action_regenerate(self) -> None:
        """A new answer to the last user message, as a sibling branch of the old one."""
        if self.busy():
            return
        request = self.chat.again()
        if request is None:
            self.notify("Nothing to regenerate yet", severity="warning")
            return
        branch = self.chat.branch()
        if branch and branch[-1].role == "assistant":  # the new answer takes the old one's place
            branch = branch[:-1]
        await self.messages.show(branch)
        self.start_turn(request)
        await self.messages.add_answer()

    def versions(self) -> tuple[list[int], int] | None:
        """Every version of the last exchange, in order: each version of the last user message
        (edits) with each of its answers (regenerations), as the message ids to show; and
        the index of the one shown. None when there is only one."""
        store = self.chat.store
        user, answer = self.chat.last_messages()
        if user is None:
            return None
        targets: list[int] = []
        for u in self.chat.call(store.siblings, user.id) or [user]:
            answers = [m for m in self.chat.call(store.children, u.id) or []
                       if m.role == "assistant"]  # fmt: skip
            targets += [m.id for m in answers] or [u.id]
        if len(targets) < 2:
            return None
        shown = answer.id if answer is not None and answer.id in targets else user.id
        return targets, targets.index(shown) if shown in targets else 0

    async def action_version(self, step: int) -> None:
        """Show the older or newer version of the last exchange (from regenerate and edit);
        it stops at the first and the last, and every branch stays reachable."""
        if self.busy():
            return
        found = self.versions()
        if found is None:
            self.notify("Only one version: regenerate (ctrl+r) or edit (ctrl+l) makes more",
                        severity="warning")  # fmt: skip
            return
        targets, i = found
        if not 0 <= i + step < len(targets):
            self.notify(f"{'Newest' if step > 0 else 'Oldest'} version ({i + 1}/{len(targets)})")
            return
        store = self.chat.store
        leaf = self.chat.call(store.latest_leaf, targets[i + step])
        if leaf is None or not self.chat.do(store.set_current_leaf, self.conversation.id, leaf):
            return
        await self.show_conversation(self.conversation.id)

    def action_edit_last(self) -> None:
        """Put the last user message in the prompt; Enter sends it as a new branch."""
        user, _ = self.chat.last_messages()
        if user is None:
            self.notify("No message to edit yet", severity="warning")
            return
        if self.busy():
            return
        self.chat.editing = user
        self.prompt.text = user.content
        self.prompt.move_cursor(self.prompt.document.end)
        self.prompt.focus()
        self.update_status()

    def action_models(self) -> None:
        self.open_models()

    def action_settings(self) -> None:
        model = (self.conversation.model if self.conversation else None) or self.model_name
        self.app.push_screen(SettingsScreen(self.settings, self.conversation is not None, model),
                             self.settings_chosen)  # fmt: skip

    def settings_chosen(self, result: tuple[ChatSettings, str] | None) -> None:
        if result is not None:
            settings, scope = result
            if scope == "default":
                self.chat.defaults = settings
                self.app.save_defaults(settings)
                self.notify("Saved as the default for new chats")
            elif scope == "next":  # a new chat: its first message creates it with these
                self.chat.defaults = settings
                self.notify("Used for this new chat (the defaults are unchanged)")
            elif self.conversation is not None:
                self.chat.save_settings(settings)
                self.notify("Saved for this chat")
        self.focus_prompt()

    def action_toggle_thinking(self) -> None:
        s = self.settings.with_(thinking=not self.settings.thinking)
        if self.conversation is not None:
            self.chat.save_settings(s)
        else:
            self.chat.defaults = s
            self.app.save_defaults(s)
        self.notify(f"Deliberation {'on' if s.thinking else 'off'}")
        self.update_status()

    def action_toggle_sidebar(self) -> None:
        self.sidebar.display = not self.sidebar.display

    def action_help(self) -> None:
        self.app.push_screen(HelpScreen())

    def action_search(self) -> None:
        self.sidebar.focus_search()

    def action_rename(self) -> None:
        if self.conversation is None:
            self.notify("Send a message first: a new chat has no title yet", severity="warning")
            return

        def renamed(title: str | None) -> None:
            if title and self.conversation is not None:
                c = self.chat.call(self.chat.store.rename, self.conversation.id, title)
                self.chat.conversation = c or self.chat.conversation
                self.refresh_conversations()
            self.focus_prompt()

        self.app.push_screen(TextPromptScreen("New title:", self.conversation.title or ""),
                             renamed)  # fmt: skip

    def action_delete(self) -> None:
        c = self.conversation
        if c is None:
            return

        async def confirmed(yes: bool | None) -> None:
            if yes:
                r = self.running
                if r is not None and r.conversation_id == c.id:
                    self.worker.stop()
                if self.chat.do(self.worker.delete, c.id):
                    await self.show_conversation(None)
                    self.refresh_conversations()
                    self.notify(f"Deleted “{c.title or 'untitled'}”")
            self.focus_prompt()

        self.app.push_screen(
            ConfirmScreen(f"Delete the conversation “{c.title or 'untitled'}”?"), confirmed
        )

    def action_copy_answer(self) -> None:
        answers = [a for a in self.messages.answers() if a.text]
        if not answers:
            self.notify("No answer to copy yet", severity="warning")
            return
        self.app.copy_to_clipboard(answers[-1].text)
        self.notify("Answer copied")

    def action_copy_code(self) -> None:
        for answer in reversed(self.messages.answers()):
            blocks = code_blocks(answer.text)
            if blocks:
                self.app.copy_to_clipboard(blocks[-1])
                self.notify("Code block copied")
                return
        self.notify("No code block in this conversation", severity="warning")

    def action_details(self, message_id: int | None = None) -> None:
        if message_id is None:
            _, answer = self.chat.last_messages()
            if answer is None:
                self.notify("No answer yet", severity="warning")
                return
            message_id = answer.id
        message = self.chat.call(self.chat.store.message, message_id)
        if message is not None:
            self.app.push_screen(DetailsScreen(details_text(message)))
