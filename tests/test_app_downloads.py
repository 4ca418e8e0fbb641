"""Downloads in the chat app, with the real huggingface_hub client against a hub served on
127.0.0.1: cancel keeps the row and resumes, a download goes on while the user chats, two
downloads queue, and an interrupted first start comes back to the models screen."""

from __future__ import annotations

import threading

import pytest

pytest.importorskip("textual")

from apertus_mlx_app.app import ChatApp  # noqa: E402
from apertus_mlx_app.screens.models import ModelsScreen  # noqa: E402

from apertus_mlx.hub import catalog, recommended  # noqa: E402
from tests.hub_server import FakeHub, point_client_at  # noqa: E402
from tests.test_app import GREEDY, SIZE, answered, anyio_backend, ask, home, wait_for  # noqa: E402, F401

pytestmark = pytest.mark.anyio


@pytest.fixture
def served(tiny_model_dir, monkeypatch):
    """The recommended model and one other catalog model, both the tiny checkpoint, served
    by a local hub; the weights of each wait for `served.release[repo]` before they are sent
    (the client waits meanwhile), so a test can act while a download runs."""

    first = recommended().repo
    second = next(e.repo for e in catalog() if e.repo != first and not e.unconfirmed)
    with FakeHub({first: tiny_model_dir}) as hub:
        # FakeHub serves a file once per name: both repos share it; gate per request order
        hub.repos[second] = tiny_model_dir
        gates = [threading.Event(), threading.Event(), threading.Event(), threading.Event()]
        calls = iter(gates)
        hub.before["model.safetensors"] = lambda: next(calls).wait(30)
        hub.gates = gates
        hub.first, hub.second = first, second
        point_client_at(monkeypatch, hub.url)
        yield hub
        for gate in gates:
            gate.set()


def row(screen: ModelsScreen, repo: str) -> list[str]:
    return [str(cell) for cell in screen.query_one("#catalog").get_row(repo)]


def weights_asked(hub, n: int):
    return lambda: sum(1 for name, _ in hub.downloads if name == "model.safetensors") >= n


async def test_cancel_keeps_the_row_partial_and_enter_resumes(served):
    app = ChatApp(settings=GREEDY)
    repo = served.second  # not the row the screen opens on
    async with app.run_test(size=SIZE) as pilot:
        await wait_for(pilot, lambda: isinstance(app.screen, ModelsScreen))
        screen = app.screen
        table = screen.query_one("#catalog")
        table.move_cursor(row=table.get_row_index(repo))
        await pilot.press("enter")
        await wait_for(pilot, weights_asked(served, 1))  # config, tokenizer… are in
        await pilot.press("c")
        assert "Cancelling" in str(screen.query_one("#download-status").render())
        served.gates[0].set()  # the weights' first bytes come: the cancel takes effect
        await wait_for(pilot, lambda: app.downloads.active is None)
        assert isinstance(app.screen, ModelsScreen)
        assert screen.selected == repo  # the cursor stayed on the row
        cells = row(screen, repo)
        assert "✓" not in cells[0] and "◐" in cells[0]
        assert "partial (" in cells[2] and "on disk" not in cells[2]

        await pilot.press("enter")  # resume: the same model, the rest of it
        served.gates[1].set()
        await wait_for(pilot, lambda: not isinstance(app.screen, ModelsScreen), 60)
        await wait_for(pilot, lambda: app.chat.loaded == repo, 60)
        await ask(app, pilot, "Hi")
        answer = await answered(app, pilot, 1)
        assert answer.text
        await pilot.press("ctrl+o")  # the row of this chat's model: ▶, downloaded
        await wait_for(pilot, lambda: isinstance(app.screen, ModelsScreen))
        mark = row(app.screen, repo)[0]
        assert "▶" in mark and "✓" in mark
    # only the weights were asked for again, not the files that had arrived
    names = [name for name, _ in served.downloads]
    assert names.count("model.safetensors") == 2 and names.count("config.json") == 1


async def test_a_download_goes_on_while_chatting_and_a_second_one_queues(served, tiny_model_dir):
    app = ChatApp(str(tiny_model_dir), GREEDY)
    async with app.run_test(size=SIZE) as pilot:
        await wait_for(pilot, lambda: app.chat.loaded is not None, 60)
        await pilot.press("ctrl+o")
        await wait_for(pilot, lambda: isinstance(app.screen, ModelsScreen))
        screen = app.screen
        table = screen.query_one("#catalog")
        table.move_cursor(row=table.get_row_index(served.first))
        await pilot.press("enter")
        table.move_cursor(row=table.get_row_index(served.second))
        await pilot.press("enter")
        assert app.downloads.queued == [served.second]
        assert row(screen, served.second)[2] == "queued"
        await pilot.press("escape")  # back to the chat: the download goes on
        assert app.screen is app.chat and app.downloads.active is not None
        status = str(app.chat.query_one("#status").render())
        assert "↓" in status and "+1 queued" in status

        await ask(app, pilot, "Hello")  # chatting while it downloads
        assert (await answered(app, pilot, 1)).text
        assert app.downloads.active is not None and app.downloads.active.repo == served.first

        served.gates[0].set()
        await wait_for(pilot, lambda: app.downloads.active is not None
                       and app.downloads.active.repo == served.second, 60)  # fmt: skip
        served.gates[1].set()
        await wait_for(pilot, lambda: app.downloads.active is None, 60)
        assert "↓" not in str(app.chat.query_one("#status").render())
        notes = [n.message for n in app._notifications]
        assert any(served.first in n and "downloaded" in n for n in notes)
        assert app.chat.loaded == str(tiny_model_dir)  # the chat kept its model

    from apertus_mlx.hub import local_models

    assert local_models()[served.first].complete and local_models()[served.second].complete


async def test_an_interrupted_first_start_comes_back_to_the_models_screen(served):
    app = ChatApp(settings=GREEDY)
    repo = served.first
    async with app.run_test(size=SIZE) as pilot:
        await wait_for(pilot, lambda: isinstance(app.screen, ModelsScreen))
        await pilot.press("enter")
        await wait_for(pilot, weights_asked(served, 1))
        await pilot.press("escape")  # leaves the screen; the app then quits mid-download
        assert app.screen is app.chat
    served.gates[0].set()

    again = ChatApp()
    async with again.run_test(size=SIZE) as pilot:
        await wait_for(pilot, lambda: isinstance(again.screen, ModelsScreen))
        assert again.screen.selected == repo
        assert "✓" not in row(again.screen, repo)[0]
        assert again.chat.loaded is None
