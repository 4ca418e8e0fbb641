"""Screenshots of the chat app's key screens (pytest-textual-snapshot; `--snapshot-update`
re-baselines). Fixed size, no model weights, no timings or temporary paths on screen."""

from __future__ import annotations

import asyncio

import pytest

pytest.importorskip("pytest_textual_snapshot")

from apertus_mlx_app.app import ChatApp  # noqa: E402

SIZE = (110, 32)


@pytest.fixture(autouse=True)
def home(tmp_path, monkeypatch):
    from huggingface_hub import constants

    import apertus_mlx.output_filter as output_filter

    monkeypatch.setenv("APERTUS_MLX_HOME", str(tmp_path / "home"))
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf"))
    monkeypatch.setattr(output_filter, "reminder", lambda today=None: None)


async def settle(pilot, condition, timeout: float = 20.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not condition():
        assert loop.time() < deadline, "timed out waiting for the app"
        await pilot.pause(0.02)
    for widget in pilot.app.screen.query("TextArea, Input"):
        widget.cursor_blink = False


def test_first_start_models_screen(snap_compare):
    from apertus_mlx_app.screens.models import ModelsScreen

    async def run_before(pilot) -> None:
        await settle(pilot, lambda: isinstance(pilot.app.screen, ModelsScreen))

    assert snap_compare(ChatApp(), run_before=run_before, terminal_size=SIZE)


def test_help_screen(snap_compare, monkeypatch):
    from textual.app import App

    # the load error's toast comes and goes on its own clock: kept off this picture of the help
    monkeypatch.setattr(App, "notify", lambda self, *args, **kwargs: None)
    app = ChatApp("apertus-mini-4b-int4")  # not downloaded: the chat says so inline

    async def run_before(pilot) -> None:
        await settle(pilot, lambda: pilot.app.chat and pilot.app.chat.query(".notice.error"))
        await pilot.press("f1")
        await settle(pilot, lambda: "Help" in type(pilot.app.screen).__name__)

    assert snap_compare(app, run_before=run_before, terminal_size=SIZE)


def test_settings_screen_refuses_a_bad_value(snap_compare, monkeypatch):
    from textual.app import App

    # as in the help picture: the load error's toast may land after any clearing of it
    monkeypatch.setattr(App, "notify", lambda self, *args, **kwargs: None)
    app = ChatApp("apertus-mini-4b-int4")

    async def run_before(pilot) -> None:
        await settle(pilot, lambda: pilot.app.chat and pilot.app.chat.query(".notice.error"))
        await pilot.press("ctrl+s")
        await settle(pilot, lambda: pilot.app.screen.query("#temperature"))
        pilot.app.screen.query_one("#temperature").value = "1.5"
        pilot.app.screen.query_one("#top_p").value = "2"
        await pilot.press("enter")
        await settle(
            pilot, lambda: "top-p" in str(pilot.app.screen.query_one("#settings-error").render())
        )

    assert snap_compare(app, run_before=run_before, terminal_size=SIZE)
