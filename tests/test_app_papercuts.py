"""The trial's smaller findings, each at its cause: ctrl+c, context-window stops, versions,
live speed, the sidebar, `history search`."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

pytest.importorskip("textual")

from apertus_mlx_app.app import ChatApp  # noqa: E402
from apertus_mlx_app.sidebar import short_title, when  # noqa: E402
from apertus_mlx_app.widgets import CONTEXT_FULL, format_stats, short_model  # noqa: E402

from tests.test_app import (  # noqa: E402, F401
    GREEDY,
    SIZE,
    answered,
    answers,
    anyio_backend,
    ask,
    gate,
    home,
    wait_for,
)

pytestmark = pytest.mark.anyio


@pytest.mark.usefixtures("gate")
async def test_ctrl_c_stops_the_answer_and_a_second_one_quits(tiny_model_dir, monkeypatch):
    app = ChatApp(str(tiny_model_dir), GREEDY.with_(max_tokens=400))
    quits: list[bool] = []
    async with app.run_test(size=SIZE) as pilot:
        monkeypatch.setattr(app, "exit", lambda *a, **k: quits.append(True))
        await wait_for(pilot, lambda: app.chat.loaded is not None)
        await ask(app, pilot, "Tell me a long story")
        await wait_for(pilot, lambda: answers(app) and answers(app)[-1].text)
        await pilot.press("ctrl+c")
        answer = await answered(app, pilot, 1)
        assert "stopped: interrupted" in answer.status and not quits  # stopped, not quit
        await pilot.press("ctrl+c")
        assert quits == [True]


def test_a_stop_at_the_context_window_says_so_not_max_tokens():
    stats = SimpleNamespace(finish_reason="length", prompt_tokens=500, generated_tokens=12,
                            cached_tokens=0, ttft_s=0.1, decode_tps=10.0)  # fmt: skip
    assert CONTEXT_FULL in format_stats(stats, window=512)
    assert "max tokens" in format_stats(stats, window=4096)  # the answer's own limit
    assert "max tokens" not in CONTEXT_FULL


async def test_versions_stop_at_both_ends_and_show_where_they_are(tiny_model_dir):
    app = ChatApp(str(tiny_model_dir), GREEDY)
    async with app.run_test(size=SIZE) as pilot:
        await wait_for(pilot, lambda: app.chat.loaded is not None)
        await ask(app, pilot, "Hi")
        await answered(app, pilot, 1)
        await pilot.press("ctrl+r")
        regenerated = await answered(app, pilot, 1)
        assert "version 2/2" in regenerated.status  # shown as soon as it is done
        await pilot.press("ctrl+l")  # an edit: a third version of the exchange
        app.chat.prompt.text = "Hello"
        await pilot.press("enter")
        await answered(app, pilot, 1)
        await app.chat.show_conversation(app.chat.conversation.id)
        assert "version 3/3" in answers(app)[-1].status
        newest = app.chat.chat.branch()[-1].id
        await pilot.press("alt+right")  # the newest: it does not wrap to the first
        await pilot.pause()
        assert app.chat.chat.branch()[-1].id == newest
        for expected in ("version 2/3", "version 1/3"):
            await pilot.press("alt+left")
            await wait_for(pilot, lambda e=expected: e in answers(app)[-1].status)
        assert app.chat.chat.branch()[-2].content == "Hi"  # the first message again
        await pilot.press("alt+left")  # the oldest: stays
        await pilot.pause()
        assert "version 1/3" in answers(app)[-1].status
        await pilot.press("alt+right", "alt+right")  # the edit is reachable again
        await wait_for(pilot, lambda: "version 3/3" in answers(app)[-1].status)
        assert app.chat.chat.branch()[-2].content == "Hello"


async def test_new_chat_resets_the_speed_and_one_token_has_none(tiny_model_dir):
    app = ChatApp(str(tiny_model_dir), GREEDY.with_(max_tokens=1))
    async with app.run_test(size=SIZE) as pilot:
        await wait_for(pilot, lambda: app.chat.loaded is not None)
        await ask(app, pilot, "Hi")
        await answered(app, pilot, 1)
        assert app.chat.tps is None  # one token has no rate
        app.chat.tps = 12.5
        await pilot.press("ctrl+n")
        assert app.chat.tps is None
        assert "– tok/s" in str(app.chat.query_one("#status").render())


def test_status_bar_names_and_sidebar_titles_are_short():
    name = short_model("swiss-ai/Apertus-v1.1-4B-Instruct-MLX-INT4")
    assert name == "Apertus-v1.1-4B-Instruct-ML…" and len(name) == 28
    assert short_model("/tmp/models/tiny") == "tiny"
    assert short_title("A title that goes on and on and on") == "A title that goes on an…"
    assert short_title("line\x08one\nline two") == "line␈one line two"
    noon = 1_700_000_000.0
    assert when(noon, now=noon + 60).count(":") == 1  # today: the time
    assert ":" not in when(noon - 40 * 86400, now=noon)  # earlier: the date


async def test_sidebar_marks_the_open_chat_shows_dates_and_esc_clears_the_search(tiny_model_dir):
    app = ChatApp(str(tiny_model_dir), GREEDY)
    async with app.run_test(size=SIZE) as pilot:
        await wait_for(pilot, lambda: app.chat.loaded is not None)
        for text in ("Rösti recipe", "Fondue"):
            await pilot.press("ctrl+n")
            await ask(app, pilot, text)
            await answered(app, pilot, 1)
        rows = app.chat.sidebar.query_one("#conversations").options
        opened = [r for r in rows if any("bold" in str(s.style) for s in r.prompt.spans)]
        assert len(rows) == 2 and len(opened) == 1
        assert opened[0].id == app.chat.conversation.id
        assert all(":" in r.prompt.plain.splitlines()[1] for r in rows)  # today: the time
        other = next(r.id for r in rows if r.id != app.chat.conversation.id)
        app.chat.sidebar.post_message(app.chat.sidebar.Chosen(other))
        await wait_for(pilot, lambda: app.chat.conversation.id == other)
        rows = app.chat.sidebar.query_one("#conversations").options
        opened = [r for r in rows if any("bold" in str(s.style) for s in r.prompt.spans)]
        assert [r.id for r in opened] == [other]  # the mark moved with the open chat
        await pilot.press("f3", *"rosti")
        await wait_for(pilot, lambda: len(app.chat.sidebar.listed) == 1)
        await pilot.press("escape")
        await wait_for(pilot, lambda: len(app.chat.sidebar.listed) == 2)
        assert app.chat.sidebar.query_one("#search").value == ""
        assert app.focused is app.chat.prompt
        assert "Stop" not in [b.description for _, b, *_ in app.chat.active_bindings.values()
                              if b.show and b.key == "escape"]  # fmt: skip


def test_history_search_lists_a_conversation_once():
    from click.testing import CliRunner

    from apertus_mlx.commands.history import history
    from apertus_mlx.store import Store

    with Store.open() as store:
        c = store.create_conversation(title="Rösti")
        store.add_message(c.id, "user", "How do I make rosti?")
    out = CliRunner().invoke(history, ["search", "rosti"]).output
    assert out.count(c.id) == 1, out


def test_answer_details_are_titled_by_time_not_by_an_internal_id():
    from datetime import datetime

    from apertus_mlx_app.screens.dialogs import details_text

    message = SimpleNamespace(id=7, settings={"model": "m"}, stats={}, seed=None,
                              finish_reason="stop", created_at=1_700_000_000.0)  # fmt: skip
    first = details_text(message).splitlines()[0]
    assert "7" not in first
    assert first == "Answer of " + datetime.fromtimestamp(1_700_000_000.0).strftime(
        "%Y-%m-%d %H:%M"
    )


async def test_quit_shows_in_the_footer_at_80_columns(tiny_model_dir):
    app = ChatApp(str(tiny_model_dir), GREEDY)

    def quit_shows() -> bool:
        keys = [k for k in app.chat.query("FooterKey") if k.key == "ctrl+q" and k.region.width]
        return bool(keys) and keys[0].region.right <= 80 - len("^p palette")

    async with app.run_test(size=(80, 24)) as pilot:
        await wait_for(pilot, lambda: app.chat.loaded is not None)
        # once the footer is laid out again after the resize (a region read earlier is the
        # one before it): times out, and fails, where Quit is cut off
        await wait_for(pilot, quit_shows, timeout=10)
