"""Every dialog by keyboard: Tab and shift+Tab follow Textual's focus chain through fields and
buttons, Enter presses the focused button, the footer names the keys, and the dialogs fit a
60x20 terminal (their buttons reachable by scrolling inside)."""

from __future__ import annotations

import pytest

pytest.importorskip("textual")

from apertus_mlx_app.app import ChatApp  # noqa: E402
from apertus_mlx_app.screens.dialogs import ConfirmScreen  # noqa: E402
from apertus_mlx_app.screens.models import ModelsScreen  # noqa: E402
from apertus_mlx_app.screens.settings import SettingsScreen  # noqa: E402
from textual.widgets import Footer  # noqa: E402

from apertus_mlx.store import Store  # noqa: E402
from tests.test_app import anyio_backend, home, wait_for  # noqa: E402, F401

pytestmark = pytest.mark.anyio
SMALL = (60, 20)


def focused(app) -> str:
    return app.focused.id or type(app.focused).__name__


def footer_keys(screen) -> set[str]:
    """The keys the screen's footer shows (its visible, active bindings)."""
    return {b.key for _, b, enabled, _ in screen.active_bindings.values() if b.show}


async def open_app(pilot, app) -> None:
    """No model: the app opens on the models screen; Esc goes back to the chat."""
    await wait_for(pilot, lambda: isinstance(app.screen, ModelsScreen))
    await pilot.press("escape")
    await wait_for(pilot, lambda: app.screen is app.chat)


async def test_tab_walks_the_settings_form_and_enter_presses_the_focused_button():
    app = ChatApp(store=Store.open(":memory:"))
    async with app.run_test(size=SMALL) as pilot:
        await open_app(pilot, app)
        await pilot.press("ctrl+s")
        await wait_for(pilot, lambda: isinstance(app.screen, SettingsScreen))
        screen = app.screen
        assert screen.query(Footer) and {"tab", "escape"} <= footer_keys(screen)
        await pilot.press(*"0.5")
        order = [focused(app)]
        for _ in range(11):
            await pilot.press("tab")
            order.append(focused(app))
        assert order == [
            "temperature", "top_p", "top_k", "min_p", "repetition_penalty", "max_tokens",
            "seed", "thinking", "system", "next", "default", "cancel",
        ]  # fmt: skip
        default = screen.query_one("#default")
        await pilot.press("shift+tab")
        assert app.focused is default
        assert default.region.bottom <= SMALL[1] and default.region.y >= 0  # scrolled in view
        assert screen.query_one("#temperature").value == "0.5"  # typed, then tabbed away
        await pilot.press("enter")  # presses "Save as default"
        await wait_for(pilot, lambda: app.screen is app.chat)
        assert app.config.defaults.temperature == 0.5


async def test_the_confirm_dialog_shows_its_keys_and_tab_moves_between_its_buttons():
    app = ChatApp(store=Store.open(":memory:"))
    results: list = []
    async with app.run_test(size=SMALL) as pilot:
        await open_app(pilot, app)
        question = "Delete swiss-ai/Apertus-v1.1-4B-Instruct-MLX-INT4 (2.3 GB) from this machine?"
        app.push_screen(ConfirmScreen(question), results.append)
        await wait_for(pilot, lambda: isinstance(app.screen, ConfirmScreen))
        screen = app.screen
        await wait_for(pilot, lambda: screen.query("#no"))
        assert {"y", "n", "tab"} <= footer_keys(screen)
        assert "(y)" in str(screen.query_one("#yes").label)
        assert "(n)" in str(screen.query_one("#no").label)
        shown = str(screen.query_one(".question").render())
        assert "from this machine?" in shown.replace("\n", " ")  # not cut
        assert focused(app) == "no"
        await pilot.press("tab")
        assert focused(app) == "yes"
        await pilot.press("shift+tab")
        assert focused(app) == "no"
        await pilot.press("tab", "enter")
        await wait_for(pilot, lambda: results == [True])
        app.push_screen(ConfirmScreen(question), results.append)
        await wait_for(pilot, lambda: isinstance(app.screen, ConfirmScreen))
        await pilot.press("n")
        await wait_for(pilot, lambda: results == [True, False])
