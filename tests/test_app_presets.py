"""Presets: named settings made in the Settings screen, kept in the app's config across
restarts, one chosen per conversation, a default per model, and `generate --preset`."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("textual")

from apertus_mlx_app.app import ChatApp  # noqa: E402
from apertus_mlx_app.screens.settings import SettingsScreen  # noqa: E402
from textual.widgets import Select  # noqa: E402

from apertus_mlx.user_config import AppConfig  # noqa: E402
from tests.test_app import SIZE, answered, anyio_backend, ask, home, wait_for  # noqa: E402, F401

pytestmark = pytest.mark.anyio


async def open_settings(app, pilot) -> SettingsScreen:
    await pilot.press("ctrl+s")
    await wait_for(pilot, lambda: isinstance(app.screen, SettingsScreen))
    await wait_for(pilot, lambda: app.screen.query("#preset"))
    return app.screen


async def test_presets_persist_across_restarts_and_start_new_chats_on_their_model(
    tiny_model_dir,
):
    model = str(tiny_model_dir)
    app = ChatApp(model)
    async with app.run_test(size=SIZE) as pilot:
        await wait_for(pilot, lambda: app.chat.loaded is not None, 60)
        screen = await open_settings(app, pilot)
        screen.query_one("#temperature").value = "0"
        screen.query_one("#max_tokens").value = "3"
        screen.query_one("#system").text = "Answer like a pirate."
        screen.query_one("#preset-name").value = "pirate"
        screen.query_one("#save-preset").press()
        await wait_for(pilot, lambda: "pirate" in app.config.presets)
        screen.query_one("#model-preset").press()  # new chats on this model start from it
        await wait_for(pilot, lambda: app.config.model_presets.get(model) == "pirate")
        await pilot.press("escape")

    saved = AppConfig.load()
    assert saved.presets["pirate"].system == "Answer like a pirate."
    assert saved.presets["pirate"].max_tokens == 3 and saved.model_presets == {model: "pirate"}

    again = ChatApp(model)
    async with again.run_test(size=SIZE) as pilot:
        await wait_for(pilot, lambda: again.chat.loaded is not None, 60)
        assert again.chat.settings.system == "Answer like a pirate."  # the model's preset
        await ask(again, pilot, "Hi")
        await answered(again, pilot, 1)
        conversation = again.store.get_conversation(again.chat.conversation.id)
        assert conversation.system == "Answer like a pirate."
        assert conversation.settings["max_tokens"] == 3

        screen = await open_settings(again, pilot)
        select = screen.query_one("#preset", Select)
        assert [value for _, value in select._options if isinstance(value, str)] == ["pirate"]
        select.value = "pirate"  # choosing it fills the form
        await pilot.pause()
        assert screen.query_one("#max_tokens").value == "3"
        screen.query_one("#delete-preset").press()
        await wait_for(pilot, lambda: "pirate" not in again.config.presets)
        assert again.config.model_presets == {}
        await pilot.press("escape")
    assert AppConfig.load().presets == {}


def test_generate_uses_a_preset_and_the_chats_last_model(tiny_model_dir):
    from apertus_mlx.settings import TurnSettings

    AppConfig(last_model=str(tiny_model_dir),
              presets={"short": TurnSettings(max_tokens=2, temperature=0.0)}).save()  # fmt: skip
    env = dict(os.environ)  # APERTUS_MLX_HOME: the test's (the `home` fixture)

    def run(*args):
        return subprocess.run([sys.executable, "-m", "apertus_mlx", "generate", *args],
                              capture_output=True, text=True, env=env, timeout=120)  # fmt: skip

    out = run("Hi", "--preset", "short", "--json")  # no -m: the chat's last model
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout)
    assert result["generated_tokens"] <= 2 and result["finish_reason"] == "length"

    out = run("Hi", "--preset", "nope")
    assert out.returncode == 2 and "no preset 'nope' (presets: short)" in out.stderr
    assert "Traceback" not in out.stderr
