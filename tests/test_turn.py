"""One conversation turn for every front end: the store, the prompt, the caches, the filter.

The expected answers come from a cold `generate` on the prompt the template renders; what is
stored is read back from the store (or the database file itself)."""

from __future__ import annotations

import json

import pytest

from apertus_mlx.errors import UsageError
from apertus_mlx.generate import Done, generate
from apertus_mlx.loading import load_model
from apertus_mlx.prompt import conversation_ids
from apertus_mlx.sampling import SamplingParams
from apertus_mlx.saved_caches import SavedCaches
from apertus_mlx.settings import TurnSettings
from apertus_mlx.store import Store
from apertus_mlx.tokenizer import load_tokenizer
from apertus_mlx.turn import Note, Started, TurnRequest, TurnService
from tests.checkpoints import cli
from tests.test_history_cli import home  # noqa: F401 - the fixture

GREEDY = TurnSettings(temperature=0, max_tokens=6)


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    return load_model(tiny_model_dir), load_tokenizer(tiny_model_dir)


def service(tiny, tmp_path, **kw) -> TurnService:
    model, tokenizer = tiny
    kw.setdefault("store", Store.open(tmp_path / "history.db"))
    kw.setdefault("saved", SavedCaches(tmp_path / "caches"))
    return TurnService(model, tokenizer, model_id="tiny", **kw)


def run(s: TurnService, request: TurnRequest):
    """(the turn, its events, its Done)."""
    turn = s.start(request)
    events = list(turn.events)
    return turn, events, next(e for e in events if isinstance(e, Done))


def cold(tiny, messages: list[dict], max_tokens: int = 6) -> Done:
    model, tokenizer = tiny
    ids = conversation_ids(tokenizer, messages).ids
    *_, done = generate(model, tokenizer, ids, params=SamplingParams(temperature=0),
                        max_tokens=max_tokens)  # fmt: skip
    return done


def test_a_follow_up_reuses_the_cache_and_answers_as_a_cold_start(tiny, tmp_path):
    s = service(tiny, tmp_path)
    first, _, a = run(s, TurnRequest.new("Grüezi!", GREEDY.with_(system="Du bist hilfreich.")))
    assert a.stats.cached_tokens == 0
    second, events, b = run(s, TurnRequest.follow(first.conversation_id, "Und wie gaht's?"))
    # all of the first turn, its answer as produced, is reused
    assert b.stats.cached_tokens >= a.stats.prompt_tokens + a.stats.generated_tokens - 1
    assert not b.stats.history_rerendered
    branch = s.store.branch(first.conversation_id)
    assert [m.role for m in branch] == ["user", "assistant", "user", "assistant"]
    assert branch[1].tokens == a.tokens and branch[3].content == b.text
    messages = [{"role": "system", "content": "Du bist hilfreich."}]
    messages += [{"role": m.role, "content": m.content} for m in branch[:3]]
    messages[2]["tokens"] = a.tokens
    assert b.tokens == cold(tiny, messages).tokens
    started = events[0]
    assert isinstance(started, Started) and started.answer_message_id == branch[3].id


def test_no_other_process_ever_sees_a_new_question_as_the_leaf(tiny, tmp_path, monkeypatch):
    """A follow-up's question and its answer's row go in together: a process reading the
    conversation in between would write its own question after this one's (seen in CI: three
    `generate --continue` at once, one question filed under another)."""
    s = service(tiny, tmp_path)
    first, _, _ = run(s, TurnRequest.new("Grüezi!", GREEDY))
    before = s.store.get_conversation(first.conversation_id).current_leaf
    other = Store.open(tmp_path / "history.db")  # another process's view
    seen: list[int | None] = []
    insert = Store._insert_message

    def watched(self, db, cid, parent_id, row):
        seen.append(other.get_conversation(cid).current_leaf)
        return insert(self, db, cid, parent_id, row)

    monkeypatch.setattr(Store, "_insert_message", watched)
    run(s, TurnRequest.follow(first.conversation_id, "Und jetzt?"))
    assert seen == [before, before]  # before the question, and before its answer's row


def test_a_refused_message_writes_nothing(tiny, tmp_path):
    s = service(tiny, tmp_path)
    with pytest.raises(UsageError, match="too long"):
        list(s.start(TurnRequest.new("Grüezi " * 2000, GREEDY)).events)
    assert s.store.list_conversations() == []
    turn, _, _ = run(s, TurnRequest.new("Grüezi!", GREEDY))
    before = s.store.messages(turn.conversation_id)
    with pytest.raises(UsageError, match="too long"):
        list(s.start(TurnRequest.follow(turn.conversation_id, "Grüezi " * 2000)).events)
    assert s.store.messages(turn.conversation_id) == before


def test_turns_attach_to_the_message_they_read(tiny, tmp_path):
    """Two turns on one conversation at once (two processes): sibling branches, each answer
    under its own question."""
    s, t = (
        service(tiny, tmp_path),
        service(tiny, tmp_path, store=Store.open(tmp_path / "history.db")),
    )
    first, _, _ = run(s, TurnRequest.new("Grüezi!", GREEDY))
    cid = first.conversation_id
    a = s.start(TurnRequest.follow(cid, "Frage A"))
    assert isinstance(next(a.events), Started)  # A has read the branch and written its question
    run(t, TurnRequest.follow(cid, "Frage B"))  # B runs while A is under way
    list(a.events)
    for m in s.store.messages(cid):
        if m.role == "assistant" and m.parent_id is not None:
            question = s.store.message(m.parent_id)
            assert question.role == "user"
    users = [m for m in s.store.messages(cid) if m.role == "user" and m.content.startswith("Frage")]
    assert len(users) == 2 and users[0].parent_id == users[1].parent_id  # siblings
    for u in users:
        answers = s.store.children(u.id)
        assert len(answers) == 1 and answers[0].role == "assistant"


def test_caches_survive_switches_and_restarts(tiny, tmp_path):
    """Answering A, then B, then A again: A's cache is still there; after a restart (a new
    service on the same disk) it comes from disk; the answer is a cold start's."""
    s = service(tiny, tmp_path)
    a, _, a_done = run(s, TurnRequest.new("Grüezi!", GREEDY))
    run(s, TurnRequest.new("Bonjour!", GREEDY))
    _, _, back = run(s, TurnRequest.follow(a.conversation_id, "Und?"))
    assert back.stats.cached_tokens >= a_done.stats.prompt_tokens + len(a_done.tokens) - 1
    assert (tmp_path / "caches" / f"{a.conversation_id}.safetensors").is_file()
    restarted = service(tiny, tmp_path)
    _, _, again = run(restarted, TurnRequest.again(a.conversation_id, _last_user(s, a)))
    assert again.stats.cached_tokens == again.stats.prompt_tokens - 1
    assert again.tokens == back.tokens


def _last_user(s: TurnService, turn) -> int:
    return [m for m in s.store.branch(turn.conversation_id) if m.role == "user"][-1].id


def test_a_damaged_or_foreign_saved_cache_is_reported_and_replaced(tiny, tmp_path):
    s = service(tiny, tmp_path)
    turn, _, _ = run(s, TurnRequest.new("Grüezi!", GREEDY))
    cid = turn.conversation_id
    file = tmp_path / "caches" / f"{cid}.safetensors"
    user = _last_user(s, turn)
    _, _, reference = run(service(tiny, tmp_path, saved=None), TurnRequest.again(cid, user))
    for spoil in ("damaged", "foreign"):
        if spoil == "damaged":
            file.write_bytes(file.read_bytes()[: len(file.read_bytes()) // 2])
        else:  # made by another model
            other = service(tiny, tmp_path)
            other.model_id = "another/model"
            other.saved.save(cid, tiny[0].make_cache(), {})  # an empty, unusable file
            file.write_bytes(file.read_bytes())
        fresh = service(tiny, tmp_path)  # a new process: nothing in memory
        _, events, done = run(fresh, TurnRequest.again(cid, user))
        notes = [e.text for e in events if isinstance(e, Note)]
        assert len(notes) == 1 and "saved KV cache" in notes[0]
        assert done.stats.cached_tokens == 0 and done.tokens == reference.tokens
        assert file.is_file()  # replaced by this answer's


def test_a_filtered_answer_keeps_only_the_prompt_in_the_cache(tiny, tmp_path):
    from apertus_mlx.output_filter import MARKER

    model, tokenizer = tiny
    _, _, plain = run(service(tiny, tmp_path / "plain"), TurnRequest.new("Grüezi!", GREEDY))
    from apertus_mlx.output_filter import words
    from tests.test_output_filter import make

    word = words(plain.text)[-1]

    f = make([word])
    s = service(tiny, tmp_path, output_filter=lambda: f)
    turn, _, done = run(s, TurnRequest.new("Grüezi!", GREEDY))
    assert MARKER in done.text and done.tokens == []
    loaded = s.saved.load(turn.conversation_id, model.make_cache(), s.identity()).cache
    assert (
        loaded.tokens == conversation_ids(tokenizer, [{"role": "user", "content": "Grüezi!"}]).ids
    )
    assert s.store.branch(turn.conversation_id)[-1].tokens == []


def test_deleting_while_the_answer_streams_leaves_nothing(tiny, tmp_path):
    s = service(tiny, tmp_path)
    first, _, _ = run(s, TurnRequest.new("Zebrafink Quokka!", GREEDY))
    cid = first.conversation_id
    turn = s.start(TurnRequest.follow(cid, "Noch einmal, Zebrafink?", overrides={"max_tokens": 40}))
    events = turn.events
    assert isinstance(next(events), Started)
    next(events)  # a chunk is out
    s.delete(cid)
    rest = list(events)
    notes = [e.text for e in rest if isinstance(e, Note)]
    assert any("deleted" in n and "not saved" in n for n in notes)
    assert turn.deleted
    assert s.store.list_conversations() == [] and s.store.search("Zebrafink") == []
    assert not list((tmp_path / "caches").glob("*"))
    assert len(s.caches) == 0
    raw = b"".join(p.read_bytes() for p in tmp_path.glob("history.db*"))
    assert b"Zebrafink" not in raw


def test_stop_strings_and_settings_are_one_shape_for_every_front_end(tiny, tmp_path):
    """What `generate --save --stop` stores is what the chat reads and keeps."""
    s = service(tiny, tmp_path)
    settings = GREEDY.with_(stop=("xyz",), top_k=5)
    turn, _, _ = run(s, TurnRequest.new("Grüezi!", settings))
    c = s.store.get_conversation(turn.conversation_id)
    assert TurnSettings.of(c) == settings
    run(s, TurnRequest.follow(c.id, "Und?"))
    answer = s.store.branch(c.id)[-1]
    assert answer.settings["stop"] == ["xyz"] and answer.settings["top_k"] == 5
    assert answer.settings["model"] == "tiny" and answer.settings["thinking"] is False
    assert TurnSettings.of(s.store.get_conversation(c.id)).stop == ("xyz",)


def test_bad_settings_and_budget_are_refused_before_anything_is_written(home, tiny_model_dir):  # noqa: F811
    out = cli("generate", "Grüezi", "-m", str(tiny_model_dir), "--save",
              env={"APERTUS_MLX_CACHE_BUDGET_GB": "inf"})  # fmt: skip
    assert out.returncode == 2 and "APERTUS_MLX_CACHE_BUDGET_GB" in out.stderr
    assert "Traceback" not in out.stderr
    assert (
        not (home / "history.db").exists()
        or json.loads(cli("history", "list", "--json").stdout) == []
    )


def test_cli_overlong_message_writes_nothing(home, tiny_model_dir):  # noqa: F811
    model = str(tiny_model_dir)
    out = cli("generate", "Grüezi " * 2000, "-m", model, "--save")
    assert out.returncode == 2 and "too long" in out.stderr
    assert json.loads(cli("history", "list", "--json").stdout) == []
    out = cli("generate", "Grüezi", "-m", model, "--save", "--temp", "0", "-n", "3", "--json")
    cid = json.loads(out.stdout)["conversation_id"]
    out = cli("generate", "Grüezi " * 2000, "--continue", cid)
    assert out.returncode == 2 and "too long" in out.stderr
    shown = json.loads(cli("history", "export", cid, "-f", "json").stdout)
    assert [m["role"] for m in shown["messages"]] == ["user", "assistant"]


def test_history_rm_while_continue_streams_leaves_nothing(home, endless_model):  # noqa: F811
    """`history rm` in another process while `generate --continue` streams: once the answer
    ends, nothing of the conversation is on disk (rows, search index, cache file)."""
    import os
    import signal
    import subprocess
    import sys

    first = cli("generate", "Zebrafink Quokka?", "-m", str(endless_model), "--temp", "0",
                "-n", "4", "--save", "--json")  # fmt: skip
    cid = json.loads(first.stdout)["conversation_id"]
    assert (home / "caches" / f"{cid}.safetensors").is_file()
    proc = subprocess.Popen(
        [sys.executable, "-m", "apertus_mlx", "generate", "Mehr!", "--continue", cid, "-n",
         "20000"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, encoding="utf-8",
        env={**os.environ, "PYTHONIOENCODING": "utf-8"},
    )  # fmt: skip
    try:
        proc.stdout.read(1)  # the answer is streaming
        assert cli("history", "rm", cid, "--yes").returncode == 0
        proc.send_signal(signal.SIGINT)  # the answer ends (it would go on for a while)
        out, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 130, err
    assert "deleted while answering" in err and "saved as" not in err
    assert json.loads(cli("history", "list", "--json").stdout) == []
    assert json.loads(cli("history", "search", "Zebrafink", "--json").stdout) == []
    assert not list((home / "caches").glob("*"))
    raw = b"".join(p.read_bytes() for p in home.glob("history.db*"))
    assert b"Zebrafink" not in raw and cid.encode() not in raw


def test_three_concurrent_continues_answer_under_their_own_questions(home, endless_model):  # noqa: F811
    """Three `generate --continue SAME` streaming at once: each answer under its own question,
    nothing lost (issue: two processes, one conversation)."""
    import subprocess
    import sys

    out = cli("generate", "Grüezi", "-m", str(endless_model), "--save", "--temp", "0", "-n",
              "3", "--json")  # fmt: skip
    cid = json.loads(out.stdout)["conversation_id"]
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "apertus_mlx",
                "generate",
                f"Frage {i}",
                "--continue",
                cid,
                "-n",
                "150",
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )  # fmt: skip
        for i in range(3)
    ]
    for p in procs:
        _, err = p.communicate(timeout=180)
        assert p.returncode == 0, err
    with Store.open(home / "history.db") as store:
        messages = store.messages(cid)
        questions = {
            m.id: m for m in messages if m.role == "user" and m.content.startswith("Frage")
        }
        assert len(questions) == 3
        for q in questions.values():
            answers = store.children(q.id)
            assert len(answers) == 1 and answers[0].finish_reason in ("stop", "length")
            assert answers[0].content  # nothing lost
        # no question follows another's question, or an answer still being written then
        for q in questions.values():
            parent = store.message(q.parent_id)
            assert parent.role == "assistant" and parent.written_at <= q.created_at


def test_two_writers_interleaved_keep_every_answer_under_its_question(tiny, tmp_path_factory):
    """Two turns on one conversation (two processes' services on one database), their steps
    interleaved at random: every answer sits under its own question, complete."""
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    @settings(max_examples=15, deadline=None, suppress_health_check=list(HealthCheck))
    @given(st.lists(st.booleans(), min_size=4, max_size=40))
    def check(order: list[bool]) -> None:
        root = tmp_path_factory.mktemp("writers")
        a = service(tiny, root, saved=None)
        b = service(tiny, root, saved=None, store=Store.open(root / "history.db"))
        first, _, _ = run(a, TurnRequest.new("Grüezi!", GREEDY))
        cid = first.conversation_id
        turns = [s.start(TurnRequest.follow(cid, f"Frage {n}")) for n, s in ((0, a), (1, b))]
        streams = [t.events for t in turns]
        done: list[Done | None] = [None, None]
        for pick in [*map(int, order), 0, 1] * 20:
            if done[pick] is None:
                for event in streams[pick]:
                    if isinstance(event, Done):
                        done[pick] = event
                    break  # one event per step
        for stream in streams:  # what follows Done (keeping the cache) runs too
            list(stream)
        store = a.store
        for n, turn in enumerate(turns):
            answer = store.message(turn.answer_message_id)
            question = store.message(answer.parent_id)
            assert question.content == f"Frage {n}" and answer.finish_reason is not None
            assert answer.content == done[n].text
            parent = store.message(question.parent_id)
            assert parent.role == "assistant" and parent.written_at <= question.created_at

    check()


def test_a_cache_that_cannot_be_saved_is_a_warning_and_a_full_disk_one_line(home, tiny_model_dir):  # noqa: F811
    """The saved-cache folder unusable: the answer is saved, one warning line. A full disk:
    one error line naming the history, exit 1, never an internal error."""
    import resource

    model = str(tiny_model_dir)
    home.mkdir(parents=True, exist_ok=True)
    (home / "caches").write_text("not a folder")
    out = cli("generate", "Grüezi", "-m", model, "-n", "4", "--save")
    assert out.returncode == 0, out.stderr
    assert "warning: KV cache not saved" in out.stderr and "saved as" in out.stderr
    assert "internal error" not in out.stderr and "Traceback" not in out.stderr

    def small_files() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (64 * 1024, 64 * 1024))

    (home / "caches").unlink()
    for f in home.glob("history.db*"):
        f.unlink()
    out = cli("generate", "Grüezi", "-m", model, "-n", "4", "--save", preexec_fn=small_files)
    assert out.returncode == 1, out.stderr
    errors = [line for line in out.stderr.splitlines() if "error" in line]
    assert len(errors) == 1 and "history not saved" in errors[0], out.stderr
    assert "internal error" not in out.stderr and "Traceback" not in out.stderr
