"""Chat sessions: follow-up turns reuse the cache and answer exactly as a fresh prefill would."""

from __future__ import annotations

from apertus_mlx.generate import Done, generate
from apertus_mlx.loading import load_model
from apertus_mlx.prompt import conversation_ids
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

    # Token-exact: all of the first turn, its answer as produced, is reused...
    assert (
        second.stats.cached_tokens >= first.stats.prompt_tokens + first.stats.generated_tokens - 1
    )
    assert not second.stats.history_rerendered
    # ...and the answer is what a cold start on the same prompt gives.
    ids = conversation_ids(tokenizer, session.messages[:-1]).ids
    *_, fresh = generate(model, tokenizer, ids, params=GREEDY, max_tokens=10)
    assert second.tokens == fresh.tokens


def test_errors_become_events_and_the_session_survives(tiny_model_dir):
    model, tokenizer = load_model(tiny_model_dir), load_tokenizer(tiny_model_dir)
    session = ChatSession(model, tokenizer, params=GREEDY, max_tokens=5)
    error = last(session.reply("x " * 2000))  # longer than the fixture's 512-token context
    assert isinstance(error, Error) and "context" in error.message
    assert session.messages == []
    assert isinstance(last(session.reply("kurz")), Done)


def test_conversations_keep_their_caches_across_switches_and_restarts(tiny_model_dir, tmp_path):
    """Answering A, then B, then A again: A's second turn starts from A's saved cache, also
    in a new session (a restart), and answers as a cold start would."""
    from apertus_mlx.saved_caches import SavedCaches, identity

    model, tokenizer = load_model(tiny_model_dir), load_tokenizer(tiny_model_dir)
    ident = identity(model, "tiny", None)

    def session():
        return ChatSession(
            model,
            tokenizer,
            params=GREEDY,
            max_tokens=6,
            saved=SavedCaches(tmp_path),
            identity=ident,
        )

    def turn(s, cid, messages):
        done = last(s.answer(messages, conversation_id=cid))
        s.persist()
        return done

    first = session()
    a = [{"role": "user", "content": "Grüezi!"}]
    a_done = turn(first, "a", a)
    turn(first, "b", [{"role": "user", "content": "Bonjour!"}])
    a2 = [*a, {"role": "assistant", "content": a_done.text, "tokens": a_done.tokens}]
    a2.append({"role": "user", "content": "Und?"})
    back = turn(first, "a", a2)  # switched back: A's cache comes from disk
    assert back.stats.cached_tokens >= a_done.stats.prompt_tokens + len(a_done.tokens) - 1
    reopened = last(session().answer(a2, conversation_id="a"))  # a new process, same disk
    assert reopened.stats.cached_tokens == len(conversation_ids(tokenizer, a2).ids) - 1
    *_, cold = generate(model, tokenizer, conversation_ids(tokenizer, a2).ids, params=GREEDY,
                        max_tokens=6)  # fmt: skip
    assert back.tokens == reopened.tokens == cold.tokens


def test_a_filtered_answer_is_not_saved_in_the_cache(tiny_model_dir, tmp_path):
    from apertus_mlx.saved_caches import SavedCaches, identity

    model, tokenizer = load_model(tiny_model_dir), load_tokenizer(tiny_model_dir)
    ident = identity(model, "tiny", None)
    s = ChatSession(model, tokenizer, params=GREEDY, max_tokens=6,
                    saved=SavedCaches(tmp_path), identity=ident)  # fmt: skip
    done = last(s.answer([{"role": "user", "content": "Grüezi!"}], conversation_id="a"))
    s.persist(answer_kept=False)
    _, tokens = SavedCaches(tmp_path).load("a", model, ident)
    assert tokens == s.prompt_ids([{"role": "user", "content": "Grüezi!"}])
    assert len(tokens) == done.stats.prompt_tokens
