"""The chat's thought fold, end to end with the scripted checkpoint that deliberates: the
thoughts stream into a fold above the answer, the fold closes when the answer starts, and a
conversation read back from the history shows them folded again (stored as thoughts)."""

from __future__ import annotations

import pytest

pytest.importorskip("textual")

from apertus_mlx_app.app import ChatApp  # noqa: E402
from apertus_mlx_app.settings import ChatSettings  # noqa: E402
from apertus_mlx_app.widgets import Thoughts  # noqa: E402

from tests.test_app import SIZE, answered, anyio_backend, ask, home, wait_for  # noqa: E402, F401

pytestmark = pytest.mark.anyio


async def test_thoughts_fold_above_the_answer_and_come_back_from_the_history(scripted):
    model = scripted("deliberation")
    app = ChatApp(str(model), ChatSettings(temperature=0.0, max_tokens=24, thinking=True))
    async with app.run_test(size=SIZE) as pilot:
        await wait_for(pilot, lambda: app.chat.loaded is not None, 60)
        await ask(app, pilot, "Hi")
        answer = await answered(app, pilot, 1)
        assert answer.text.strip() == "Grüezi mitenand!"  # the answer alone
        fold = answer.query_one(Thoughts)
        assert fold.text.strip() == "Let me think." and fold.collapsed
        assert answer.children[0] is fold  # above the answer
        conversation_id = app.chat.conversation.id
        stored = app.store.branch(conversation_id)[-1]
        assert any(p["type"] == "thoughts" for p in stored.parts)

        await pilot.press("ctrl+n")
        await app.chat.show_conversation(conversation_id)
        await pilot.pause()
        again = app.chat.messages.answers()[-1]
        fold = again.query_one(Thoughts)
        assert fold.text.strip() == "Let me think." and fold.collapsed
