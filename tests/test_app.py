"""The chat app, driven through Textual's Pilot against tiny real checkpoints, a real history
store and config in a temporary APERTUS_MLX_HOME, and an empty temporary Hugging Face cache."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import threading
from collections.abc import Callable
from pathlib import Path

import pytest

pytest.importorskip("textual")

from apertus_mlx_app.app import ChatApp  # noqa: E402
from apertus_mlx_app.screens.models import ModelsScreen  # noqa: E402
from apertus_mlx_app.screens.settings import SettingsScreen  # noqa: E402
from apertus_mlx_app.settings import AppConfig, ChatSettings  # noqa: E402
from apertus_mlx_app.widgets import AssistantMessage, Notice, UserMessage  # noqa: E402

from apertus_mlx.prompt import fit_window  # noqa: E402

GREEDY = ChatSettings(temperature=0.0, max_tokens=24)
SIZE = (110, 36)

pytestmark = pytest.mark.anyio  # anyio's pytest plugin runs the async tests


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"  # Textual runs on asyncio


@pytest.fixture(autouse=True)
def home(tmp_path, monkeypatch) -> Path:
    """History and config in tmp; an empty Hugging Face cache in tmp."""
    from huggingface_hub import constants

    monkeypatch.setenv("APERTUS_MLX_HOME", str(tmp_path / "home"))
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf"))
    return tmp_path / "home"


async def wait_for(pilot, condition: Callable[[], bool], timeout: float = 20.0) -> None:
    """Let the app run until `condition` holds; fail after `timeout` seconds."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not condition():
        if loop.time() > deadline:
            raise AssertionError("timed out waiting for the app")
        await pilot.pause(0.02)


async def ask(app: ChatApp, pilot, text: str) -> None:
    app.chat.prompt.focus()
    app.chat.prompt.text = text
    await pilot.press("enter")


def answers(app: ChatApp) -> list[AssistantMessage]:
    return list(app.chat.query(AssistantMessage))


async def answered(app: ChatApp, pilot, count: int) -> AssistantMessage:
    await wait_for(pilot, lambda: len(answers(app)) == count and answers(app)[-1].finished)
    await wait_for(pilot, lambda: app.chat.running is None)
    return answers(app)[-1]


@pytest.fixture
def gate(monkeypatch) -> threading.Event:
    """A model slower than the test: after its first token it waits until the gate opens
    (or the answer is stopped), so the test can act while an answer is streaming."""
    import apertus_mlx.turn as session
    from apertus_mlx.generate import Chunk

    opened = threading.Event()
    real_generate = session.generate

    def slow_generate(*args, stop_event: threading.Event | None = None, **kwargs):
        for event in real_generate(*args, stop_event=stop_event, **kwargs):
            yield event
            if isinstance(event, Chunk) and event.text:
                for _ in range(500):
                    if opened.is_set() or (stop_event is not None and stop_event.is_set()):
                        break
                    opened.wait(0.02)

    monkeypatch.setattr(session, "generate", slow_generate)
    return opened


async def test_first_start_downloads_the_recommended_model(tiny_model_dir, tmp_path, monkeypatch):
    """No model: the models screen with the recommended one highlighted; Enter downloads it
    from the (local) hub with progress, the chat opens on it, and the next start remembers it."""

    from apertus_mlx.hub import recommended
    from tests.hub_server import FakeHub, point_client_at

    repo = recommended().repo
    with FakeHub({repo: tiny_model_dir}) as hub:
        point_client_at(monkeypatch, hub.url)
        app = ChatApp(settings=GREEDY)
        progress: list[str] = []
        async with app.run_test(size=SIZE) as pilot:
            await wait_for(pilot, lambda: isinstance(app.screen, ModelsScreen))
            screen = app.screen
            assert screen.query("#first-start")
            assert screen.selected == repo  # the recommended model is highlighted
            real = ModelsScreen.download_progress

            def spy(self, message):
                real(self, message)
                progress.append(str(self.query_one("#download-status").render()))

            monkeypatch.setattr(ModelsScreen, "download_progress", spy)
            await pilot.press("enter")
            await wait_for(pilot, lambda: not isinstance(app.screen, ModelsScreen), 60)
            await wait_for(pilot, lambda: app.chat.loaded == repo, 60)
            assert app.focused is app.chat.prompt  # typing goes to the prompt at once
            await ask(app, pilot, "Hi")
            answer = await answered(app, pilot, 1)
            await pilot.press("f5")  # copy the answer
            assert app.clipboard == answer.text

            await pilot.press("ctrl+o")  # the models screen: downloaded, with its size
            await wait_for(pilot, lambda: isinstance(app.screen, ModelsScreen))
            row = app.screen.query_one("#catalog").get_row(repo)
            assert "✓" in row[0] and "on disk" in row[2]
            await pilot.press("d")
            await wait_for(pilot, lambda: app.screen.query("#yes"))
            await pilot.press("y")
            await wait_for(pilot, lambda: isinstance(app.screen, ModelsScreen))
            await wait_for(
                pilot, lambda: "✓" not in app.screen.query_one("#catalog").get_row(repo)[0]
            )
            await pilot.press("escape")
    assert any("MB" in line or "KB" in line for line in progress), progress
    assert AppConfig.load().last_model == repo

    again = ChatApp()
    async with again.run_test(size=SIZE) as pilot:
        # the last model, deleted: the models screen on it, not an error in the chat
        await wait_for(pilot, lambda: isinstance(again.screen, ModelsScreen))
        assert again.screen.selected == repo
        assert repo in str(again.screen.query_one("#first-start").render())
        assert not again.chat.query(Notice)
        await pilot.press("escape")
        rows = again.chat.sidebar.query_one("#conversations").options
        assert [row.prompt.plain.splitlines()[0] for row in rows] == ["Hi"]  # kept


def test_download_cancel_then_resume(tiny_model_dir, tmp_path, monkeypatch):

    from apertus_mlx import hub
    from tests.hub_server import FakeHub, point_client_at

    repo = "test-org/apertus-tiny"
    with FakeHub({repo: tiny_model_dir}) as served:
        point_client_at(monkeypatch, served.url)
        cancel = threading.Event()
        seen: list[tuple[int, int]] = []

        def report(done: int, total: int) -> None:
            seen.append((done, total))
            cancel.set()  # the first bytes arrived: stop

        with pytest.raises(hub.DownloadCancelled):
            hub.download(repo, progress=report, cancel=cancel)
        assert seen  # it had started
        done: list[tuple[int, int]] = []
        path = hub.download(repo, progress=lambda d, t: done.append((d, t)))
        assert (path / "model.safetensors").exists()
        assert done and done[-1][0] == done[-1][1] > 0  # the bar ends full


async def test_send_stream_regenerate_and_edit_as_branches(tiny_model_dir):
    app = ChatApp(str(tiny_model_dir), GREEDY)
    async with app.run_test(size=SIZE) as pilot:
        await pilot.press(*"Hello")  # typed while the model loads: kept, in the prompt
        assert app.chat.prompt.text == "Hello"
        await wait_for(pilot, lambda: app.chat.loaded is not None)
        assert app.focused is app.chat.prompt
        saved = AppConfig.load()  # the model is remembered; command-line settings are not
        assert saved.last_model == str(tiny_model_dir) and saved.defaults == ChatSettings()
        await ask(app, pilot, "Hello there")
        first = await answered(app, pilot, 1)
        assert first.text.strip() and "tok/s" in first.status
        assert "context" in str(app.chat.query_one("#status").render())
        assert app.chat.context_used > 0 and app.chat.context == 512

        store, cid = app.store, app.chat.conversation.id
        assert [m.role for m in store.branch(cid)] == ["user", "assistant"]

        await pilot.press("ctrl+r")  # regenerate: a sibling answer
        await answered(app, pilot, 1)
        branch = store.branch(cid)
        assert len(store.siblings(branch[-1].id)) == 2
        await pilot.press("alt+left")  # back to the first version
        await wait_for(pilot, lambda: store.branch(cid)[-1].id != branch[-1].id)
        assert answers(app)[-1].message_id == store.branch(cid)[-1].id != branch[-1].id
        await pilot.press("alt+right")
        await wait_for(pilot, lambda: store.branch(cid)[-1].id == branch[-1].id)

        await pilot.press("ctrl+l")  # edit the last message
        assert app.chat.prompt.text == "Hello there"
        app.chat.prompt.text = "Hello again"
        await pilot.press("enter")
        await answered(app, pilot, 1)
        branch = store.branch(cid)
        assert [m.content for m in branch if m.role == "user"] == ["Hello again"]
        assert len(store.siblings(branch[0].id)) == 2  # the old question is a branch
        assert [str(w.render()) for w in app.chat.query(UserMessage)] == ["Hello again"]

        await pilot.press("f9")  # details of the last answer
        await wait_for(pilot, lambda: app.screen.query("#details"))
        details = str(app.screen.query_one("#details").render())
        assert str(tiny_model_dir) in details and "stop" in details and "tokens/s" in details
        await pilot.press("escape")


async def test_escape_stops_and_the_partial_answer_stays(tiny_model_dir, gate):
    app = ChatApp(str(tiny_model_dir), GREEDY.with_(max_tokens=400))
    async with app.run_test(size=SIZE) as pilot:
        await wait_for(pilot, lambda: app.chat.loaded is not None)
        await ask(app, pilot, "Tell me a long story")
        await wait_for(pilot, lambda: answers(app) and answers(app)[-1].text)
        assert app.chat.generating
        await pilot.press("escape")
        answer = await answered(app, pilot, 1)
        assert "stopped: interrupted" in answer.status
        assert answer.text
        stored = app.store.branch(app.chat.conversation.id)[-1]
        assert stored.finish_reason == "interrupted" and stored.content == answer.text


async def test_switching_conversations_while_an_answer_streams(tiny_model_dir, gate):
    app = ChatApp(str(tiny_model_dir), GREEDY.with_(max_tokens=16))
    async with app.run_test(size=SIZE) as pilot:
        await wait_for(pilot, lambda: app.chat.loaded is not None)
        gate.set()
        await ask(app, pilot, "First chat")
        await answered(app, pilot, 1)
        first = app.chat.conversation.id
        gate.clear()

        await pilot.press("ctrl+n")
        await ask(app, pilot, "Second chat")
        await wait_for(pilot, lambda: answers(app) and answers(app)[-1].text)
        second = app.chat.conversation.id
        await app.chat.show_conversation(first)  # what clicking it in the list does
        await pilot.pause()
        assert [str(w.render()) for w in app.chat.query(UserMessage)] == ["First chat"]
        assert all(a.finished for a in answers(app))
        await pilot.press("h", "i")  # typing works meanwhile
        assert app.chat.prompt.text == "hi"
        assert app.chat.running is not None  # the other answer goes on

        gate.set()
        await wait_for(pilot, lambda: app.chat.running is None)
        assert len(answers(app)) == 1  # nothing of the other answer landed here
        stored = app.store.branch(second)[-1]
        assert stored.finish_reason in ("stop", "length") and stored.content

        await app.chat.show_conversation(second)
        await pilot.pause()
        assert answers(app)[-1].text == stored.content


async def test_settings_persist_and_a_bad_value_is_refused(tiny_model_dir, home):
    app = ChatApp(str(tiny_model_dir))
    async with app.run_test(size=SIZE) as pilot:
        await wait_for(pilot, lambda: app.chat.loaded is not None)
        await pilot.press("ctrl+s")
        await wait_for(pilot, lambda: isinstance(app.screen, SettingsScreen))
        screen = app.screen
        screen.query_one("#temperature").value = "-1"
        await pilot.press("enter")  # Enter in a field saves (as the default: no chat yet)
        await pilot.pause()
        assert isinstance(app.screen, SettingsScreen)
        assert "temperature must be >= 0" in str(screen.query_one("#settings-error").render())
        screen.query_one("#temperature").value = "warm"
        await pilot.press("enter")
        await pilot.pause()
        assert "'warm' is not a number" in str(screen.query_one("#settings-error").render())
        assert AppConfig.load().defaults == ChatSettings()  # nothing saved

        screen.query_one("#temperature").value = "0"
        screen.query_one("#max_tokens").value = "1"
        screen.query_one("#system").text = "Answer in German."
        await pilot.press("enter")
        await wait_for(pilot, lambda: not isinstance(app.screen, SettingsScreen))
        assert app.focused is app.chat.prompt
    saved = json.loads(AppConfig.path().read_text())
    assert saved["defaults"]["temperature"] == 0 and saved["defaults"]["max_tokens"] == 1

    again = ChatApp(str(tiny_model_dir))
    async with again.run_test(size=SIZE) as pilot:
        await wait_for(pilot, lambda: again.chat.loaded is not None)
        assert again.chat.settings.system == "Answer in German."
        await ask(again, pilot, "Hi")
        answer = await answered(again, pilot, 1)
        assert "stopped: length" in answer.status  # max tokens 1 was used
        conversation = again.store.get_conversation(again.chat.conversation.id)
        assert (
            conversation.system == "Answer in German." and conversation.settings["max_tokens"] == 1
        )


async def test_switching_models_keeps_the_history(tiny_model_dir, checkpoint):
    other = checkpoint("mha-default-rope-bf16") if "mha-default-rope-bf16" in _variants() else None
    if other is None:
        other = checkpoint(sorted(n for n in _variants() if n != "gqa-llama3-f32")[0])
    app = ChatApp(str(tiny_model_dir), GREEDY)
    async with app.run_test(size=SIZE) as pilot:
        await wait_for(pilot, lambda: app.chat.loaded is not None)
        await ask(app, pilot, "Hello")
        await answered(app, pilot, 1)
        app.chat.model_chosen(str(other))  # what choosing it on the models screen does
        await wait_for(pilot, lambda: app.chat.loaded == str(other))
        await ask(app, pilot, "And now?")
        await answered(app, pilot, 2)
        branch = app.store.branch(app.chat.conversation.id)
        assert len(branch) == 4  # the history stays
        assert branch[-1].settings["model"] == str(other)
        assert branch[1].settings["model"] == str(tiny_model_dir)
        assert branch[-1].stats["prompt_tokens"] > branch[1].stats["prompt_tokens"]


def _variants() -> list[str]:
    from tests.checkpoints import VARIANTS

    return list(VARIANTS)


async def test_search_rename_and_delete(tiny_model_dir):
    app = ChatApp(str(tiny_model_dir), GREEDY)
    async with app.run_test(size=SIZE) as pilot:
        await wait_for(pilot, lambda: app.chat.loaded is not None)
        await ask(app, pilot, "Rösti recipe please")
        await answered(app, pilot, 1)
        await pilot.press("ctrl+n")
        await ask(app, pilot, "Fondue for two")
        await answered(app, pilot, 1)
        assert len(app.chat.sidebar.listed) == 2
        await pilot.press("ctrl+n")

        await pilot.press("f3")
        assert app.focused is app.chat.query_one("#search")
        await pilot.press("escape")  # back to the message box
        assert app.focused is app.chat.prompt
        await pilot.press("f3")
        await pilot.press(*"fondue")
        await wait_for(pilot, lambda: len(app.chat.sidebar.listed) == 1)
        await pilot.press("enter", "enter")  # to the list, then open the hit
        await wait_for(
            pilot, lambda: app.chat.conversation and app.chat.conversation.title == "Fondue for two"
        )
        assert [str(w.render()) for w in app.chat.query(UserMessage)] == ["Fondue for two"]

        app.chat.prompt.focus()
        await pilot.press("f2")
        await wait_for(pilot, lambda: app.screen.query("#answer"))
        app.screen.query_one("#answer").value = "Cheese night"
        await pilot.press("enter")
        await wait_for(pilot, lambda: app.chat.conversation.title == "Cheese night")

        await pilot.press("f8")
        await wait_for(pilot, lambda: app.screen.query("#yes"))
        await pilot.click("#yes")
        await wait_for(pilot, lambda: app.chat.conversation is None)
        assert [c.title for c in app.store.list_conversations()] == ["Rösti recipe please"]


async def test_help_palette_and_newline_key(tiny_model_dir):
    app = ChatApp(str(tiny_model_dir), GREEDY)
    async with app.run_test(size=SIZE) as pilot:
        await wait_for(pilot, lambda: app.chat.loaded is not None)
        titles = {c.title for c in app.get_system_commands(app.screen)}
        wanted = (
            "Regenerate",
            "Edit last message",
            "Models",
            "Settings",
            "Search history",
            "Copy last code block",
            "Answer details",
            "Delete conversation",
            "Keys",
        )
        assert set(wanted) <= titles
        await pilot.press("a", "ctrl+j", "b")
        assert app.chat.prompt.text == "a\nb"
        app.chat.prompt.text = ""
        await pilot.press("f1")
        await wait_for(pilot, lambda: "HelpScreen" in type(app.screen).__name__)
        await pilot.press("escape")
        await wait_for(pilot, lambda: app.focused is app.chat.prompt)
        await pilot.press("ctrl+p")
        await wait_for(pilot, lambda: "CommandPalette" in type(app.screen).__name__)
        await pilot.press("escape")
        await wait_for(pilot, lambda: app.screen is app.chat)
        await pilot.press("x")
        assert app.chat.prompt.text == "x"  # typing lands in the prompt after the palette


def test_code_blocks_are_found_for_copying():
    from apertus_mlx_app.widgets import code_blocks

    text = "Try:\n```python\nprint(1)\n```\nor\n```\nls -l\n```\nand ```open"
    assert code_blocks(text) == ["print(1)\n", "ls -l\n"]


async def test_deliberation_toggle_is_kept_per_chat(tiny_model_dir):
    app = ChatApp(str(tiny_model_dir), GREEDY)
    async with app.run_test(size=SIZE) as pilot:
        await wait_for(pilot, lambda: app.chat.loaded is not None)
        await pilot.press("ctrl+t")
        assert app.chat.settings.thinking and "deliberation on" in str(
            app.chat.query_one("#status").render()
        )
        await ask(app, pilot, "Think first")
        await answered(app, pilot, 1)
        assert app.store.get_conversation(app.chat.conversation.id).thinking
        stored = app.store.branch(app.chat.conversation.id)[-1]
        assert stored.settings["thinking"] is True


def test_context_budget_drops_oldest_turns_and_keeps_the_system_prompt():
    history = [{"role": "system", "content": "s"}]
    for i in range(4):
        history += [{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": f"a{i}"}]
    history.append({"role": "user", "content": "last"})

    def count(messages):
        return 100 * len(messages)

    kept, dropped = fit_window(history, count, window=500, reserve=100)
    assert kept[0]["role"] == "system" and kept[-1]["content"] == "last"
    assert dropped == 6 and [m["content"] for m in kept] == ["s", "q3", "a3", "last"]
    assert fit_window(history, count, window=10_000, reserve=100) == (history, 0)


async def test_a_long_conversation_says_what_it_leaves_out(tiny_model_dir):
    app = ChatApp(str(tiny_model_dir), GREEDY.with_(max_tokens=8))
    words = " ".join(["cheese"] * 80)  # about 330 tokens: two turns overflow the 512 window
    async with app.run_test(size=SIZE) as pilot:
        await wait_for(pilot, lambda: app.chat.loaded is not None)
        await ask(app, pilot, words)
        await answered(app, pilot, 1)
        await ask(app, pilot, words + " again")
        await answered(app, pilot, 2)
        notes = [str(n.render()) for n in app.chat.query(Notice)]
        assert any("oldest 2 messages are left out" in n for n in notes), notes


async def test_bad_model_path_shows_one_line_error_in_view(tmp_path):
    app = ChatApp(str(tmp_path / "missing"))
    async with app.run_test(size=SIZE) as pilot:
        await wait_for(pilot, lambda: bool(app.chat.query(Notice)))
        text = str(app.chat.query_one(Notice).render())
        assert "no model directory" in text and "Traceback" not in text
        assert app.focused is app.chat.prompt


def test_cli_imports_textual_only_for_chat():
    code = (
        "import sys; from apertus_mlx.cli import cli\n"
        "cli.get_command(None, 'generate'); cli.get_command(None, 'models')\n"
        "assert 'textual' not in sys.modules\n"
        "cli.get_command(None, 'chat')\n"
        "print(sorted(p.name for p in cli.get_command(None, 'chat').params))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert "model_name" in out.stdout and "top_p" in out.stdout


async def test_the_installed_output_filter_guards_screen_and_store(tiny_model_dir, tmp_path):
    from apertus_mlx.filter_format import read_filter, write_compiled
    from apertus_mlx.output_filter import MARKER, installed_path, phrase_digest, words

    app = ChatApp(str(tiny_model_dir), GREEDY)
    async with app.run_test(size=SIZE) as pilot:
        await wait_for(pilot, lambda: app.chat.loaded is not None)
        notes = [n.message for n in app._notifications]
        assert any("no output filter installed" in n for n in notes)  # reminded once
        await ask(app, pilot, "Grüezi mitenand!")
        plain = (await answered(app, pilot, 1)).text
        said = words(plain)
        assert said, plain

        doc = {"version": "test", "published": "2026-01-01", "algorithm": "sha256",
               "normalization": "nfkc-casefold-words", "max_words": 1,
               "entries": [phrase_digest(said[0])]}  # fmt: skip
        source = tmp_path / "filter.json"
        source.write_text(json.dumps(doc), encoding="utf-8")
        write_compiled(read_filter(source), installed_path())

        await pilot.press("ctrl+r")
        answer = await answered(app, pilot, 1)
        assert MARKER in answer.text and said[0] not in words(answer.text)
        stored = app.store.branch(app.chat.conversation.id)[-1]
        assert stored.content == answer.text and not stored.tokens

        # replaced by a filter with one more entry (as `filter install` does): it applies
        # from the next answer on, without restarting the chat
        second = next(w for w in said if w != said[0])
        assert second in words(answer.text)
        doc["entries"].append(phrase_digest(second))
        source.write_text(json.dumps(doc), encoding="utf-8")
        write_compiled(read_filter(source), installed_path())
        await pilot.press("ctrl+r")
        answer = await answered(app, pilot, 1)
        assert not {said[0], second} & set(words(answer.text))
        assert app.store.branch(app.chat.conversation.id)[-1].content == answer.text


def test_quits_cleanly_after_chatting(tiny_model_dir, home):
    """The process exits with status 0 after the model thread ran MLX work (no abort at exit)."""
    script = (
        "import asyncio, sys\n"
        "from apertus_mlx_app.app import ChatApp\n"
        "from apertus_mlx_app.settings import ChatSettings\n"
        "from tests.test_app import answered, ask, wait_for\n"
        "async def main():\n"
        "    app = ChatApp(sys.argv[1], ChatSettings(temperature=0.0, max_tokens=8))\n"
        "    async with app.run_test() as pilot:\n"
        "        await wait_for(pilot, lambda: app.chat.loaded is not None)\n"
        "        await ask(app, pilot, 'Hi')\n"
        "        await answered(app, pilot, 1)\n"
        "        await pilot.press('ctrl+q')\n"
        "    print('quit', app.return_code)\n"
        "asyncio.run(main())\n"
    )
    root = Path(__file__).resolve().parent.parent
    env = {**os.environ, "APERTUS_MLX_HOME": str(home)}
    out = subprocess.run([sys.executable, "-c", script, str(tiny_model_dir)], cwd=root, env=env,
                         capture_output=True, text=True, timeout=60)  # fmt: skip
    assert out.returncode == 0, out.stderr[-2000:]
    assert "quit 0" in out.stdout


async def test_a_download_shows_rate_and_time_left_and_can_be_cancelled(monkeypatch):
    """The models screen's wiring, with a download that waits to be cancelled."""
    from apertus_mlx import hub

    def slow_download(name, *, progress=None, cancel=None):
        done = 20_000_000  # already on disk from an earlier, cancelled download
        while not cancel.wait(0.05):
            progress(done, 200_000_000)
            done = min(done + 1_000_000, 150_000_000)
        raise hub.DownloadCancelled("download cancelled")

    monkeypatch.setattr(hub, "download", slow_download)
    app = ChatApp()
    async with app.run_test(size=SIZE) as pilot:
        await wait_for(pilot, lambda: isinstance(app.screen, ModelsScreen))
        screen = app.screen
        await pilot.press("enter")
        await wait_for(pilot, lambda: "MB/s" in str(screen.query_one("#download-status").render()))
        line = str(screen.query_one("#download-status").render())
        assert " / 200.0 MB · " in line and "s left" in line
        assert screen.query_one("#download-bar").display
        await pilot.press("c")
        await wait_for(pilot, lambda: app.downloads.active is None)
        assert "cancelled" in str(screen.query_one("#download-status").render())
        assert isinstance(app.screen, ModelsScreen)  # still there, to resume or choose


async def test_a_damaged_config_is_reported_and_the_app_starts(tiny_model_dir, home):
    home.mkdir(parents=True, exist_ok=True)
    (home / "config.json").write_text("{not json")
    app = ChatApp(str(tiny_model_dir))
    async with app.run_test(size=SIZE) as pilot:
        await wait_for(pilot, lambda: app.chat.loaded is not None)
        notes = [n.message for n in app._notifications]
        assert any("config.json" in n and "starting on defaults" in n for n in notes)
        assert app.chat.settings == ChatSettings()


async def test_an_unusable_history_still_chats_and_says_so(tiny_model_dir, tmp_path, monkeypatch):
    blocked = tmp_path / "a-file"
    blocked.write_text("not a directory")
    monkeypatch.setenv("APERTUS_MLX_HOME", str(blocked / "home"))
    app = ChatApp(str(tiny_model_dir), GREEDY)
    async with app.run_test(size=SIZE) as pilot:
        await wait_for(pilot, lambda: app.chat.loaded is not None or bool(app.chat.query(Notice)))
        assert any("not saved" in n.message for n in app._notifications)
        await ask(app, pilot, "Hi")
        assert (await answered(app, pilot, 1)).text


async def test_a_conversation_deleted_elsewhere_is_a_notification(tiny_model_dir):
    """Another process deletes the conversation the list still shows: choosing it, or acting
    on it, tells the user; the app keeps running."""
    from apertus_mlx.saved_caches import delete_conversation
    from apertus_mlx.store import Store

    app = ChatApp(str(tiny_model_dir), GREEDY)
    async with app.run_test(size=SIZE) as pilot:
        await wait_for(pilot, lambda: app.chat.loaded is not None)
        await ask(app, pilot, "Hello")
        await answered(app, pilot, 1)
        cid = app.chat.conversation.id
        with Store.open() as other:  # `apertus-mlx history rm` in another terminal
            delete_conversation(other, cid)
        await pilot.press("f2")  # rename it: the store says it is gone
        await wait_for(pilot, lambda: app.screen.query("#answer"))
        app.screen.query_one("#answer").value = "Cheese"
        await pilot.press("enter")
        await wait_for(pilot, lambda: any("no longer" in n.message for n in app._notifications))
        await app.chat.show_conversation(cid)  # what choosing it in the stale list does
        await pilot.press("ctrl+r")
        assert app.is_running and app.chat.conversation is None
        await ask(app, pilot, "Still here?")
        await answered(app, pilot, 1)


async def test_deleting_while_the_answer_streams_leaves_nothing(tiny_model_dir, gate, home):
    app = ChatApp(str(tiny_model_dir), GREEDY.with_(max_tokens=400))
    async with app.run_test(size=SIZE) as pilot:
        await wait_for(pilot, lambda: app.chat.loaded is not None)
        await ask(app, pilot, "Zebrafink, erzähl!")
        await wait_for(pilot, lambda: answers(app) and answers(app)[-1].text)
        cid = app.chat.conversation.id
        await pilot.press("f8")
        await wait_for(pilot, lambda: app.screen.query("#yes"))
        await pilot.press("y")
        await wait_for(pilot, lambda: app.chat.running is None)
        assert app.store.list_conversations() == [] and app.store.search("Zebrafink") == []
    assert not list((home / "caches").glob("*"))
    raw = b"".join(p.read_bytes() for p in home.glob("history.db*"))
    assert b"Zebrafink" not in raw and cid.encode() not in raw


async def test_a_refused_message_goes_back_to_the_message_box(tiny_model_dir):
    app = ChatApp(str(tiny_model_dir), GREEDY)
    async with app.run_test(size=SIZE) as pilot:
        await wait_for(pilot, lambda: app.chat.loaded is not None)
        long = "Grüezi " * 2000
        await ask(app, pilot, long)
        await wait_for(pilot, lambda: any("too long" in n.message for n in app._notifications))
        await wait_for(pilot, lambda: app.chat.running is None)
        assert app.chat.prompt.text.strip() == long.strip()
        assert app.store.list_conversations() == [] and not answers(app)


def test_cli_and_chat_answers_are_stored_alike(tiny_model_dir, home):
    """A `generate --save --stop` answer and a chat answer on the same conversation: the
    same settings shape, the same details, and the CLI's stop strings kept by the chat."""
    from apertus_mlx_app.screens.dialogs import details_text

    from apertus_mlx.store import Store
    from tests.checkpoints import cli

    out = cli("generate", "Grüezi", "-m", str(tiny_model_dir), "--save", "--temp", "0",
              "-n", "5", "--stop", "xyz", "--json")  # fmt: skip
    assert out.returncode == 0, out.stderr
    cid = json.loads(out.stdout)["conversation_id"]

    async def chat_turn() -> None:
        app = ChatApp(str(tiny_model_dir))
        async with app.run_test(size=SIZE) as pilot:
            await wait_for(pilot, lambda: app.chat.loaded is not None)
            await app.chat.show_conversation(cid)
            await ask(app, pilot, "Und?")
            await answered(app, pilot, 2)

    import anyio

    anyio.run(chat_turn)
    with Store.open() as store:
        cli_answer, chat_answer = [m for m in store.branch(cid) if m.role == "assistant"]
        assert set(cli_answer.settings) == set(chat_answer.settings)
        assert chat_answer.settings["stop"] == ["xyz"]
        assert store.get_conversation(cid).settings["stop"] == ["xyz"]
        rows = []
        for m in (cli_answer, chat_answer):
            lines = details_text(m).splitlines()[2:]
            rows.append(
                dict(
                    line.split(None, 1)
                    if "  " not in line
                    else [part.strip() for part in line.split("  ", 1)]
                    for line in lines
                )
            )
        for r in rows:
            assert r["model"] == str(tiny_model_dir) and r["deliberation"] == "off"
            assert r["temperature"] == "0.0"
        assert rows[0].keys() == rows[1].keys()
