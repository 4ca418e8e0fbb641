"""The chat UI, driven through Textual's Pilot against the tiny fixture checkpoint."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import threading
from collections.abc import Callable
from pathlib import Path

import pytest

pytest.importorskip("textual")

from apertus_mlx_app.app import ChatApp  # noqa: E402
from apertus_mlx_app.widgets import AssistantMessage, UserMessage  # noqa: E402
from apertus_mlx_app.worker import ChatSettings  # noqa: E402

GREEDY = ChatSettings(temperature=0.0)
SIZE = (100, 40)

pytestmark = pytest.mark.anyio  # anyio's pytest plugin runs the async tests


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"  # Textual runs on asyncio


async def wait_for(pilot, condition: Callable[[], bool], timeout: float = 20.0) -> None:
    """Let the app run until `condition` holds; fail after `timeout` seconds."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not condition():
        if loop.time() > deadline:
            raise AssertionError("timed out waiting for the app")
        await pilot.pause(0.02)


async def ask(app: ChatApp, pilot, text: str) -> None:
    app.query_one("#prompt").focus()
    app.query_one("#prompt").value = text
    await pilot.press("enter")


def answers(app: ChatApp) -> list[AssistantMessage]:
    return list(app.query(AssistantMessage))


def status(answer: AssistantMessage) -> str:
    return str(answer.query_one(".status").render())


async def test_welcome_panel_without_a_model():
    app = ChatApp()
    async with app.run_test(size=SIZE) as pilot:
        await pilot.pause()
        source = app.query_one("#welcome").source
        assert "apertus-mlx chat --model DIR_OR_REPO" in source
        assert "apertus-8b" in source  # catalog aliases are listed
        assert not app.model_ready
        await pilot.press("ctrl+q")
    assert app.return_code == 0


async def test_bad_model_path_shows_one_line_error(tmp_path):
    app = ChatApp(str(tmp_path / "missing"))
    async with app.run_test(size=SIZE) as pilot:
        await wait_for(pilot, lambda: bool(app.query(".load-error")))
        text = str(app.query_one(".load-error").render())
        assert "no model directory" in text and "Traceback" not in text
        assert not app.prompt.disabled  # usable: another model can be typed in


async def test_bad_checkpoint_then_load_by_typing(tmp_path, tiny_model_dir):
    (tmp_path / "config.json").write_text("{not json")
    app = ChatApp(str(tmp_path), GREEDY)
    async with app.run_test(size=SIZE) as pilot:
        await wait_for(pilot, lambda: bool(app.query(".load-error")))
        assert "config.json" in str(app.query_one(".load-error").render())
        await ask(app, pilot, str(tiny_model_dir))
        await wait_for(pilot, lambda: app.model_ready)
        assert not app.query(".load-error")


async def test_chat_streams_answer_with_stats_then_new_conversation(tiny_model_dir, monkeypatch):
    import apertus_mlx

    loading_seen = threading.Event()
    real_load = apertus_mlx.load

    def gated_load(*args, **kwargs):  # holds the model back until the test saw the loading state
        loading_seen.wait(10)
        return real_load(*args, **kwargs)

    monkeypatch.setattr(apertus_mlx, "load", gated_load)
    app = ChatApp(str(tiny_model_dir), ChatSettings(temperature=0.0, max_tokens=24))
    async with app.run_test(size=SIZE) as pilot:
        assert app.prompt.disabled and app.query_one("#loading").display
        assert not app.model_ready
        loading_seen.set()
        await wait_for(pilot, lambda: app.model_ready)
        assert not app.query_one("#loading").display
        titles = [c.title for c in app.get_system_commands(app.screen)]
        assert "New conversation" in titles and "Quit" in titles
        assert not app.prompt.disabled

        await ask(app, pilot, "Hello there")
        await wait_for(pilot, lambda: answers(app) and answers(app)[-1].finished)
        answer = answers(app)[-1]
        assert answer.text.strip()
        assert "tokens" in status(answer) and "tok/s" in status(answer)
        assert "first token" in status(answer)
        assert str(app.query_one(UserMessage).render()) == "Hello there"

        await ask(app, pilot, "And again")  # a second turn reuses the session's cache
        await wait_for(pilot, lambda: len(answers(app)) == 2 and answers(app)[-1].finished)
        assert "cached" in status(answers(app)[-1])

        await pilot.press("ctrl+n")
        await wait_for(pilot, lambda: not app.query(UserMessage) and not answers(app))
        await ask(app, pilot, "Fresh start")
        await wait_for(pilot, lambda: answers(app) and answers(app)[-1].finished)
        assert "cached" not in status(answers(app)[-1])  # the old conversation is gone


async def test_max_tokens_cut_is_visible(tiny_model_dir):
    app = ChatApp(str(tiny_model_dir), ChatSettings(temperature=0.0, max_tokens=3))
    async with app.run_test(size=SIZE) as pilot:
        await wait_for(pilot, lambda: app.model_ready)
        await ask(app, pilot, "Hi")
        await wait_for(pilot, lambda: answers(app) and answers(app)[-1].finished)
        assert "stopped: length" in status(answers(app)[-1])


async def test_escape_stops_a_long_answer(tiny_model_dir, monkeypatch):
    """A model slower than the test: after its first token it waits (bounded) to be stopped."""
    import apertus_mlx.session as session
    from apertus_mlx.generate import Chunk

    real_generate = session.generate

    def slow_generate(*args, stop_event: threading.Event | None = None, **kwargs):
        for event in real_generate(*args, stop_event=stop_event, **kwargs):
            yield event
            if isinstance(event, Chunk) and stop_event is not None:
                stop_event.wait(10)

    monkeypatch.setattr(session, "generate", slow_generate)
    app = ChatApp(str(tiny_model_dir), ChatSettings(temperature=0.0, max_tokens=4096))
    async with app.run_test(size=SIZE) as pilot:
        await wait_for(pilot, lambda: app.model_ready)
        await ask(app, pilot, "Tell me a long story")
        await wait_for(pilot, lambda: answers(app) and answers(app)[-1].text)
        assert app.generating
        await pilot.press("escape")
        await wait_for(pilot, lambda: answers(app)[-1].finished)
        answer = answers(app)[-1]
        assert "stopped: interrupted" in status(answer)
        assert answer.text  # the partial answer stays
        assert not app.generating


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


def test_quits_cleanly_after_chatting(tiny_model_dir):
    """The process exits with status 0 after the model thread ran MLX work (no abort at exit)."""
    script = (
        "import asyncio, sys\n"
        "from apertus_mlx_app.app import ChatApp\n"
        "from apertus_mlx_app.worker import ChatSettings\n"
        "from tests.test_app import answers, ask, wait_for\n"
        "async def main():\n"
        "    app = ChatApp(sys.argv[1], ChatSettings(temperature=0.0, max_tokens=8))\n"
        "    async with app.run_test() as pilot:\n"
        "        await wait_for(pilot, lambda: app.model_ready)\n"
        "        await ask(app, pilot, 'Hi')\n"
        "        await wait_for(pilot, lambda: answers(app) and answers(app)[-1].finished)\n"
        "        await pilot.press('ctrl+q')\n"
        "    print('quit', app.return_code)\n"
        "asyncio.run(main())\n"
    )
    root = Path(__file__).resolve().parent.parent
    out = subprocess.run([sys.executable, "-c", script, str(tiny_model_dir)], cwd=root,
                         capture_output=True, text=True, timeout=60)  # fmt: skip
    assert out.returncode == 0, out.stderr[-2000:]
    assert "quit 0" in out.stdout
