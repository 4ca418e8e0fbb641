"""The chat app: a scrolling conversation, an input line, and a model thread doing the work.

State flows one way: the UI sends jobs to `ModelWorker` (load, reply, stop, new conversation)
and reacts to the messages it posts back; nothing here touches MLX.
"""

from __future__ import annotations

from collections.abc import Iterable

from textual import on
from textual.app import App, ComposeResult, SystemCommand
from textual.binding import Binding
from textual.containers import Horizontal, VerticalScroll
from textual.reactive import reactive
from textual.screen import Screen
from textual.widgets import Footer, Header, Input, LoadingIndicator, Markdown, Static

from .widgets import AssistantMessage, UserMessage, format_stats, welcome_text
from .worker import AnswerChunk, AnswerDone, ChatSettings, ModelFailed, ModelLoaded, ModelWorker

ASK_PLACEHOLDER = "Message Apertus (Enter sends)"
LOAD_PLACEHOLDER = "Model directory, repo id or catalog alias to load (Enter)"


class ChatApp(App):
    """`apertus-mlx chat`: talk to one model; Esc stops an answer, ctrl+n starts afresh."""

    TITLE = "apertus-mlx"
    CSS_PATH = "chat.tcss"
    BINDINGS = [
        Binding("escape", "stop", "Stop answer"),
        Binding("ctrl+n", "new_conversation", "New chat"),
        Binding("ctrl+q", "quit", "Quit", priority=True),
    ]

    generating: reactive[bool] = reactive(False, bindings=True)
    model_ready: reactive[bool] = reactive(False, bindings=True)

    def __init__(self, model: str | None = None, settings: ChatSettings | None = None) -> None:
        super().__init__()
        self.model_name = model
        self.settings = settings or ChatSettings()
        self.turn = 0
        self.worker: ModelWorker | None = None
        self._answer: AssistantMessage | None = None

    def compose(self) -> ComposeResult:
        yield Header()
        yield VerticalScroll(id="messages")
        with Horizontal(id="loading"):
            yield LoadingIndicator()
            yield Static(id="loading-label")
        yield Input(placeholder=LOAD_PLACEHOLDER, id="prompt")
        yield Footer()

    def on_mount(self) -> None:
        self.worker = ModelWorker(self.post_message, self.settings)
        self.query_one("#loading").display = False
        if self.model_name:
            self.load_model(self.model_name)
        else:
            self.show_welcome()

    def on_unmount(self) -> None:
        if self.worker is not None:
            self.worker.shutdown(timeout=2.0)

    # --- model --------------------------------------------------------------------------
    def show_welcome(self) -> None:
        from apertus_mlx.hub import catalog

        try:
            aliases = [(e.alias, e.params, e.format, e.size_gb) for e in catalog()]
        except Exception:  # noqa: BLE001 - the welcome panel must show even without a catalog
            aliases = []
        self.messages.mount(Markdown(welcome_text(aliases), id="welcome"))

    def load_model(self, name: str) -> None:
        self.model_name = name
        self.model_ready = False
        self.sub_title = f"loading {name}"
        self.query_one("#loading-label", Static).update(f"Loading {name}…")
        self.query_one("#loading").display = True
        self.prompt.disabled = True
        self.worker.load(name)

    def on_model_loaded(self, message: ModelLoaded) -> None:
        self.model_ready = True
        self.sub_title = message.name
        self.query_one("#loading").display = False
        self.messages.remove_children()
        self.messages.anchor()  # follow the answer as it streams in
        self.prompt.placeholder = ASK_PLACEHOLDER
        self.prompt.disabled = False
        self.prompt.focus()

    def on_model_failed(self, message: ModelFailed) -> None:
        self.sub_title = "no model"
        self.query_one("#loading").display = False
        text = f"Could not load {message.name}: {message.error}"
        self.messages.mount(Static(text, classes="error load-error", markup=False))
        self.prompt.placeholder = LOAD_PLACEHOLDER
        self.prompt.disabled = False
        self.prompt.focus()

    # --- conversation -------------------------------------------------------------------
    @property
    def messages(self) -> VerticalScroll:
        return self.query_one("#messages", VerticalScroll)

    @property
    def prompt(self) -> Input:
        return self.query_one("#prompt", Input)

    @property
    def answer(self) -> AssistantMessage | None:
        """The answer of the current turn, if it is on screen."""
        answer = self._answer
        return answer if answer is not None and answer.turn == self.turn else None

    @on(Input.Submitted, "#prompt")
    async def send(self, event: Input.Submitted) -> None:
        text = event.value.strip()
        if not text:
            return
        if not self.model_ready:
            self.prompt.clear()
            self.load_model(text)
            return
        if self.generating:
            self.notify("Wait for the answer, or press Esc to stop it.", severity="warning")
            return
        self.prompt.clear()
        self.turn += 1
        self.generating = True
        self._answer = AssistantMessage(self.turn)
        await self.messages.mount_all([UserMessage(text), self._answer])
        self.worker.reply(self.turn, text)

    async def on_answer_chunk(self, message: AnswerChunk) -> None:
        answer = self.answer
        if message.turn == self.turn and answer is not None:
            await answer.append(message.text)

    async def on_answer_done(self, message: AnswerDone) -> None:
        if message.turn != self.turn:
            return  # a turn from a conversation that was cleared
        self.generating = False
        answer = self.answer
        if answer is None:
            return
        if message.error:
            await answer.finish(f"error: {message.error}", error=True)
        else:
            await answer.finish(format_stats(message.stats))

    # --- actions ------------------------------------------------------------------------
    def check_action(self, action: str, parameters: tuple[object, ...]) -> bool | None:
        if action == "stop":
            return self.generating
        if action == "new_conversation":
            return self.model_ready
        return True

    def action_stop(self) -> None:
        """Stop the answer; the part already generated stays, in the UI and in the history."""
        if self.generating and self.worker is not None:
            self.worker.stop()

    async def action_new_conversation(self) -> None:
        if self.worker is None or not self.model_ready:
            return
        self.worker.new_conversation()
        self.turn += 1  # answers still arriving from the old conversation are dropped
        self.generating = False
        await self.messages.remove_children()
        self.prompt.clear()
        self.prompt.focus()

    def get_system_commands(self, screen: Screen) -> Iterable[SystemCommand]:
        yield from super().get_system_commands(screen)
        if self.generating:
            yield SystemCommand("Stop answer", "Stop generating (Esc)", self.action_stop)
        if self.model_ready:
            yield SystemCommand(
                "New conversation", "Clear the chat and start afresh (ctrl+n)",
                self.action_new_conversation,
            )  # fmt: skip
