"""Chat sessions: follow-up turns reuse the cache and answer exactly as a fresh prefill would."""

from __future__ import annotations

from apertus_mlx.generate import Done, generate
from apertus_mlx.loading import load_model
from apertus_mlx.sampling import SamplingParams
from apertus_mlx.session import ChatSession, Error
from apertus_mlx.tokenizer import load_tokenizer

GREEDY = SamplingParams(temperature=0)


def last(events):
    events = list(events)
    return events[-1]


def test_second_turn_reuses_cache_and_matches_fresh(tiny_model_dir):
    model, tokenizer = load_model(tiny_model_dir), load_tokenizer(tiny_model_dir)
    session = ChatSession(
        model, tokenizer, system="Du bist hilfreich.", params=GREEDY, max_tokens=10
    )
    first = last(session.reply("Grüezi!"))
    assert isinstance(first, Done) and first.stats.cached_tokens == 0
    second = last(session.reply("Und wie gaht's?"))
    assert isinstance(second, Done)
    assert second.stats.cached_tokens > first.stats.prompt_tokens // 2
    assert [m["role"] for m in session.messages] == [
        "system",
        "user",
        "assistant",
        "user",
        "assistant",
    ]

    ids = tokenizer.apply_chat_template(session.messages[:-1])
    *_, fresh = generate(model, tokenizer, ids, params=GREEDY, max_tokens=10)
    assert second.tokens == fresh.tokens


def test_errors_become_events_and_the_session_survives(tiny_model_dir):
    model, tokenizer = load_model(tiny_model_dir), load_tokenizer(tiny_model_dir)
    session = ChatSession(model, tokenizer, params=GREEDY, max_tokens=5)
    error = last(session.reply("x " * 2000))  # longer than the fixture's 512-token context
    assert isinstance(error, Error) and "context" in error.message
    assert session.messages == []
    assert isinstance(last(session.reply("kurz")), Done)
