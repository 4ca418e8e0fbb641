"""Untrusted model text on screen: the display filter as a property, and the conversation view
fuzzed through Pilot (random Unicode, control characters, unbalanced Markdown, huge lines):
no exception, and what the store holds is what the model said."""

from __future__ import annotations

import asyncio
import unicodedata

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

pytest.importorskip("textual")

from apertus_mlx_app.app import ChatApp  # noqa: E402
from apertus_mlx_app.display_text import MAX_LINE, DisplayFilter, for_display  # noqa: E402
from apertus_mlx_app.widgets import AssistantMessage, UserMessage  # noqa: E402
from textual.widgets import Markdown  # noqa: E402

from apertus_mlx.store import Store  # noqa: E402

PIECES = [
    "```", "```python\n", "    \x08\x07code", "| a | b |\n", "|---|\n", "| x |", "<|inner_prefix|>",
    "<|", "|>", "<|assistant_end|>", "<SPECIAL_12>", "<SPEC", "\r\n", "\r", "\x1b[31m", "\x85",
    "\u202e", "\x00", "**",
    "# ", "> ", "- [ ] ", "[link](", "<div>", "\t", "\n\n", "$$", "\\", "~~~", "é",
    "👍🏽", "\u0301",
]  # fmt: skip
texts = st.lists(
    st.one_of(st.sampled_from(PIECES), st.text(max_size=20), st.just("x" * 100_000)),
    max_size=12,
).map("".join)


def controls(text: str) -> set[str]:
    """Characters a terminal would act on: C0 and C1 controls other than newline and tab."""
    return {c for c in text if unicodedata.category(c) == "Cc" and c not in "\n\t"}


@given(text=texts, cuts=st.lists(st.integers(min_value=0), max_size=8))
@settings(max_examples=200, deadline=None)
def test_the_display_filter_is_the_same_however_the_text_streams_in(text, cuts):
    bounds = sorted({c % (len(text) + 1) for c in cuts})
    chunks = [text[a:b] for a, b in zip([0, *bounds], [*bounds, len(text)])]
    f = DisplayFilter()
    streamed = "".join(f.feed(c) for c in chunks) + f.flush()
    assert streamed == for_display(text)
    assert not controls(streamed)
    assert "<|inner_prefix|>" not in streamed and "<SPECIAL_12>" not in streamed
    note = len(" … (100000 more characters)")
    assert all(len(line) <= MAX_LINE + note for line in streamed.split("\n"))


def test_what_the_filter_shows_for_known_cases():
    assert for_display("a\x08b\x07") == "a␈b␇"
    assert for_display("x\r\ny") == "x\ny"
    assert for_display("<|inner_prefix|>hm<|inner_suffix|>ok") == "⟨inner_prefix⟩hm⟨inner_suffix⟩ok"
    assert for_display("\x85\u202eabc") == "\\x85\\u202eabc"
    assert for_display("a<SPECIAL_9>b<SPECIAL") == "a⟨SPECIAL_9⟩b<SPECIAL"
    assert for_display("y" * 10, max_line=4) == "yyyy … (6 more characters)"
    assert for_display("plain *markdown* `code`\n\tok") == "plain *markdown* `code`\n\tok"


async def show_and_stream(text: str, chunks: list[str], home) -> None:
    """The text as a stored answer drawn from the store, then streamed into a live answer."""
    store = Store.open(":memory:")
    c = store.create_conversation(title="fuzz")
    store.add_message(c.id, "user", text)
    answer_id = store.add_message(c.id, "assistant", text, finish_reason="stop").id
    app = ChatApp(store=store)
    async with app.run_test(size=(80, 24)) as pilot:
        while app.chat is None or not app.chat.is_mounted:
            await pilot.pause(0.01)
        await app.chat.show_conversation(c.id)
        await pilot.pause()
        shown = list(app.chat.query(AssistantMessage))
        assert shown and shown[-1].text == text
        assert app.chat.query(UserMessage).last().text == text
        live = AssistantMessage()
        await app.chat.messages.mount(live)
        for i, chunk in enumerate(chunks):
            await live.append(chunk)
            while i < len(chunks) - 1 and live.pending:  # drawn, but for the last chunk
                await pilot.pause(0.01)
        drawn = live.query_one(Markdown).source
        assert not controls(drawn)  # streamed: nothing a terminal acts on reaches a widget
        await live.finish("done")
        await pilot.pause()
        assert live.text == text
        # streamed, then finished: drawn as the stored answer is drawn whole
        assert live.query_one(Markdown).source == shown[-1].query_one(Markdown).source
        for widget in (live, shown[-1]):
            drawn = widget.query_one(Markdown).source
            assert not controls(drawn) and "<|inner_prefix|>" not in drawn
    assert store.message(answer_id).content == text  # the store keeps what the model said


@given(text=texts, cuts=st.lists(st.integers(min_value=0), max_size=5))
@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow,
          HealthCheck.function_scoped_fixture])  # fmt: skip
def test_the_conversation_view_survives_any_text(text, cuts, tmp_path, monkeypatch):
    monkeypatch.setenv("APERTUS_MLX_HOME", str(tmp_path / "home"))
    bounds = sorted({c % (len(text) + 1) for c in cuts})
    chunks = [text[a:b] for a, b in zip([0, *bounds], [*bounds, len(text)])]
    asyncio.run(show_and_stream(text, chunks, tmp_path))
