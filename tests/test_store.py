"""The history store: schema migrations, branches, search, streaming answers, failures, writers
in several processes at once."""

from __future__ import annotations

import json
import sqlite3
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from apertus_mlx.errors import StoreError, UnknownConversationError
from apertus_mlx.store import Store, decode_tokens, encode_tokens
from apertus_mlx.store_schema import MIGRATIONS, SCHEMA_VERSION, migrate

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def store(tmp_path):
    with Store.open(tmp_path / "history.db") as s:
        yield s


def integrity(path: Path) -> str:
    db = sqlite3.connect(path)
    try:
        return db.execute("PRAGMA integrity_check").fetchone()[0]
    finally:
        db.close()


def run_python(code: str, *args: str, timeout: float = 60, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=ROOT,
        **kw,
    )


# -- schema -----------------------------------------------------------------------------------


def _old_database(path: Path, version: int) -> None:
    """A database as an older apertus-mlx left it, with a conversation if it had the tables."""
    db = sqlite3.connect(path, isolation_level=None)
    migrate(db, target=version)
    if version >= 1:
        db.execute(
            "INSERT INTO conversations (id, title, model, settings, thinking, current_leaf,"
            " created_at, updated_at) VALUES ('0123abcd', 'Fondue recipe', 'm', '{}', 0, 2, 1, 1)"
        )
        db.execute(
            "INSERT INTO messages (id, conversation_id, role, content, created_at)"
            " VALUES (1, '0123abcd', 'user', 'How is fondue made?', 1)"
        )
        db.execute(
            "INSERT INTO messages (id, conversation_id, parent_id, role, content, tokens,"
            " finish_reason, created_at) VALUES (2, '0123abcd', 1, 'assistant',"
            " 'Melt Gruyère with wine.', ?, 'stop', 1)",
            (encode_tokens([7, 8, 9]),),
        )
    db.close()


@pytest.mark.parametrize("version", range(SCHEMA_VERSION))
def test_migrates_from_every_older_version(tmp_path, version):
    path = tmp_path / "history.db"
    _old_database(path, version)
    with Store.open(path) as store:
        assert store._db.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
        if version >= 1:  # the data survived and the indexes cover rows older than them
            branch = store.branch("0123")
            assert [m.content for m in branch] == ["How is fondue made?", "Melt Gruyère with wine."]
            assert branch[1].tokens == [7, 8, 9]
            assert {h.message_id for h in store.search("gruyere")} == {2}
            assert [h.message_id for h in store.search("recipe")] == [None]
        c = store.create_conversation(model="m")
        store.add_message(c.id, "user", "new fondue question")
        assert len({h.conversation_id for h in store.search("fondue")}) == (2 if version else 1)
    assert integrity(path) == "ok"


def test_migrations_are_ordered_and_each_applied_once(tmp_path):
    path = tmp_path / "private" / "history.db"
    Store.open(path).close()
    Store.open(path).close()  # a second open finds nothing to do
    db = sqlite3.connect(path)
    assert db.execute("PRAGMA user_version").fetchone()[0] == len(MIGRATIONS)
    assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert path.parent.stat().st_mode & 0o777 == 0o700  # a new directory: the user's alone


def test_a_newer_schema_is_refused_in_one_line(tmp_path):
    path = tmp_path / "history.db"
    Store.open(path).close()
    db = sqlite3.connect(path)
    db.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    db.close()
    with pytest.raises(StoreError, match="newer than this apertus-mlx"):
        Store.open(path)


# -- conversations and branches ---------------------------------------------------------------


def test_title_comes_from_the_first_user_message_until_renamed(store):
    c = store.create_conversation(model="swiss-ai/Apertus-8B", revision="abc", system="Be brief.")
    assert c.title is None and c.system == "Be brief." and c.revision == "abc"
    store.add_message(c.id, "user", "Wie macht man eine richtig gute Rösti mit Speck und Zwiebeln?")
    store.add_message(c.id, "assistant", "Mit Geduld.")
    store.add_message(c.id, "user", "Und ohne Speck?")
    assert store.get_conversation(c.id).title == "Wie macht man eine richtig gute Rösti mit …"
    store.rename(c.id, "Rösti")
    store.add_message(c.id, "user", "Danke")
    assert store.get_conversation(c.id).title == "Rösti"


def test_ids_are_short_and_a_unique_prefix_finds_them(store):
    c = store.create_conversation()
    assert len(c.id) == 8 and all(ch in "0123456789abcdef" for ch in c.id)
    assert store.get_conversation(c.id[:4].upper()).id == c.id
    store._write(
        lambda db: db.executemany(
            "INSERT INTO conversations (id, settings, created_at, updated_at)"
            " VALUES (?, '{}', 0, 0)",
            [("abcd0001",), ("abcd0002",)],
        )
    )
    with pytest.raises(UnknownConversationError, match="several"):
        store.get_conversation("abcd")
    assert store.get_conversation("abcd0002").id == "abcd0002"
    for bad in ("abc", "zzzzzzzz", "ffffffff", "' OR 1=1 --"):
        with pytest.raises(UnknownConversationError) as e:
            store.get_conversation(bad)
        assert e.value.exit_code == 2 and "\n" not in str(e.value)


def test_list_is_most_recently_updated_first(store):
    a, b, c = (store.create_conversation() for _ in range(3))
    store.add_message(a.id, "user", "later")
    assert [x.id for x in store.list_conversations()] == [a.id, c.id, b.id]
    assert [x.id for x in store.list_conversations(limit=1)] == [a.id]


def test_edit_and_regenerate_make_branches(store):
    c = store.create_conversation()
    q1 = store.add_message(c.id, "user", "q1")
    a1 = store.add_message(c.id, "assistant", "a1")
    q2 = store.add_message(c.id, "user", "q2")
    a2 = store.add_message(c.id, "assistant", "a2")
    # regenerate the last answer: a sibling of a2
    writer = store.start_answer(c.id, parent_id=q2.id)
    writer.append("a2 again", [5, 6])
    assert writer.finish("stop") is None
    assert [m.content for m in store.branch(c.id)] == ["q1", "a1", "q2", "a2 again"]
    assert [m.id for m in store.siblings(a2.id)] == [a2.id, writer.message_id]
    # edit the second question: a new branch after a1
    q2b = store.add_message(c.id, "user", "q2 edited", parent_id=a1.id)
    assert [m.content for m in store.branch(c.id)] == ["q1", "a1", "q2 edited"]
    assert [m.id for m in store.children(a1.id)] == [q2.id, q2b.id]
    # edit the very first question: a second root
    root2 = store.add_message(c.id, "user", "q1 edited", parent_id=None)
    assert [m.id for m in store.siblings(q1.id)] == [q1.id, root2.id]
    assert [m.content for m in store.branch(c.id)] == ["q1 edited"]
    # navigate back: the newest branch below q2
    store.set_current_leaf(c.id, store.latest_leaf(q2.id))
    assert [m.content for m in store.branch(c.id)] == ["q1", "a1", "q2", "a2 again"]
    assert len(store.messages(c.id)) == 7
    other = store.create_conversation()
    with pytest.raises(ValueError):
        store.add_message(other.id, "user", "x", parent_id=q1.id)
    with pytest.raises(ValueError):
        store.set_current_leaf(other.id, q1.id)


def test_update_conversation_and_delete_cascades(store):
    c = store.create_conversation(model="a", settings={"temperature": 0.8})
    m = store.add_message(c.id, "user", "raclette")
    updated = store.update_conversation(
        c.id, model="b", revision="r1", system="s", settings={"temperature": 0}, thinking=True
    )
    assert (updated.model, updated.revision, updated.system) == ("b", "r1", "s")
    assert updated.settings == {"temperature": 0} and updated.thinking
    with pytest.raises(TypeError):
        store.update_conversation(c.id, id="ffffffff")
    assert store.delete(c.id[:5]).id == c.id
    with pytest.raises(UnknownConversationError):
        store.get_conversation(c.id)
    with pytest.raises(KeyError):
        store.message(m.id)
    assert store.search("raclette") == []


@settings(max_examples=40, deadline=None)
@given(st.lists(st.integers(0, 2**32 - 1), max_size=50))
def test_token_ids_round_trip_exactly(tokens):
    blob = encode_tokens(tokens)
    assert len(blob) == 4 * len(tokens) and decode_tokens(blob) == tokens


operations = st.lists(
    st.one_of(
        # (kind, connection, conversation (add, start) or open writer (append, finish), text,
        #  parent: -2 the current leaf, -1 a new root, k the conversation's k-th message)
        st.tuples(
            st.just("add"),
            st.integers(0, 1),
            st.integers(0, 2),
            st.text(max_size=12),
            st.integers(-2, 6),
        ),
        st.tuples(st.just("start"), st.integers(0, 1), st.integers(0, 2), st.just(""), st.just(0)),
        st.tuples(
            st.just("append"), st.just(0), st.integers(0, 5), st.text(max_size=12), st.just(0)
        ),
        st.tuples(st.just("finish"), st.just(0), st.integers(0, 5), st.just(""), st.just(0)),
    ),
    max_size=30,
)


@settings(max_examples=25, deadline=None)
@given(operations)
def test_interleaved_writers_keep_every_message_and_branch(ops):
    """Two connections to one file, messages and streaming answers interleaved at random: the
    store agrees with a plain Python model of the tree and of each current branch."""
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        stores = [Store.open(Path(tmp) / "h.db"), Store.open(Path(tmp) / "h.db")]
        cids = [stores[0].create_conversation().id for _ in range(3)]
        tree: dict[int, tuple[str, int | None, str, list[str]]] = {}  # id -> cid, parent, role
        leaf: dict[str, int | None] = dict.fromkeys(cids)
        writers = []
        for kind, which, conv, text, pick in ops:
            if kind in ("add", "start"):
                cid = cids[conv]
                mine = [m for m, v in tree.items() if v[0] == cid]
                parent = (
                    "leaf"
                    if pick == -2
                    else None
                    if pick == -1 or not mine
                    else mine[pick % len(mine)]
                )
                if kind == "add":
                    mid = stores[which].add_message(cid, "user", text, parent_id=parent).id
                else:
                    writers.append(stores[which].start_answer(cid, parent_id=parent, interval=60))
                    mid = writers[-1].message_id
                tree[mid] = (cid, leaf[cid] if parent == "leaf" else parent, kind, [text])
                leaf[cid] = mid
            elif writers:
                writer = writers[conv % len(writers)]
                if kind == "append":
                    writer.append(text, [len(text)])
                    tree[writer.message_id][3].append(text)
                    writer.flush()
                else:
                    assert writer.finish("stop") is None
                    writers.remove(writer)
        for writer in writers:
            assert writer.finish("interrupted") is None
        for cid in cids:
            got = [(m.id, m.parent_id, m.content) for m in stores[1].messages(cid)]
            want = [(m, v[1], "".join(v[3])) for m, v in sorted(tree.items()) if v[0] == cid]
            assert got == want
            path, node = [], leaf[cid]
            while node is not None:
                path.append(node)
                node = tree[node][1]
            assert [m.id for m in stores[0].branch(cid)] == path[::-1]
        for store in stores:
            store.close()
        assert integrity(Path(tmp) / "h.db") == "ok"


# -- search -----------------------------------------------------------------------------------


def test_search_finds_words_across_languages_and_accents(store):
    c = store.create_conversation()
    store.add_message(c.id, "user", "Was isch Rösti?")
    w = store.start_answer(c.id)
    w.append("Rösti sind geröstete Kartoffeln.", [1])
    w.flush()  # streamed text is searchable before the answer ends
    assert {h.role for h in store.search("kartoffeln")} == {"assistant"}
    w.finish("stop")
    hits = store.search("rosti")
    assert {h.message_id for h in hits} >= {1, 2}
    assert any("[Rösti]" in h.snippet for h in hits)
    assert store.search("Rösti Kartoffeln")[0].role == "assistant"  # every word must match
    assert store.search("   ") == []


SEARCHED = ["a or b", "a only", "near a b", "b a", "col x", "xylophone", "the x", "salt and pepper"]


@pytest.mark.parametrize(
    ("text", "found"),
    [
        ('"', []),  # no word in it: nothing to look for
        ("'", []),
        ("(", []),
        ("AND", ["salt and pepper"]),  # the word, not the operator (alone, a syntax error)
        ("a OR b", ["a or b"]),  # every word must match: not "a" or "b"
        ("NEAR(a b)", ["near a b"]),  # not "a" near "b"
        ("col:x", ["col x"]),  # not a column filter
        ("x*", ["col x", "the x"]),  # not a prefix: no "xylophone"
        ("-x", ["col x", "the x"]),
        ("^x", ["col x", "the x"]),  # not "x at the start"
        ('"a" "b', ["a or b", "near a b", "b a"]),  # an unbalanced quote
    ],
)
def test_search_takes_operators_and_quotes_as_plain_text(store, text, found):
    c = store.create_conversation(title="untitled")
    ids = {store.add_message(c.id, "user", t).id: t for t in SEARCHED}
    hits = store.search(text)
    assert sorted(ids[h.message_id] for h in hits) == sorted(found)


@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(st.text())
def test_search_never_raises(store, text):
    """Any text is safe to search for, and finds a message holding it when it has a word
    (an ASCII letter or digit is part of one in any script; SQLite ends indexed text at NUL)."""
    c = store.create_conversation(title="untitled")
    mid = store.add_message(c.id, "user", f"before {text} after").id
    hits = {h.message_id for h in store.search(text, limit=100_000)}
    if any(ch.isascii() and ch.isalnum() for ch in text) and "\x00" not in text:
        assert mid in hits


# Letters and digits of several scripts, spaces, punctuation and FTS5's operator characters
# (letters SQLite's tokenizer knows: its tables are older than some of Unicode's letters).
SCRIPTS = "abcxyzABCXYZ019äöüßéçñøÅ€…«»—αβγабв中文字日本語"
SEARCHABLE = st.text(alphabet=st.sampled_from(list(" \t\n.,;:!?'\"()*^-+~/" + SCRIPTS)))


@settings(
    max_examples=80, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(SEARCHABLE)
def test_search_for_any_text_finds_a_message_that_contains_it(store, text):
    c = store.create_conversation(title="untitled")
    mid = store.add_message(c.id, "user", f"before {text} after").id
    hits = {h.message_id for h in store.search(text, limit=100_000)}
    assert (mid in hits) == any(ch.isalnum() for ch in text)


# -- streaming answers ------------------------------------------------------------------------


def test_a_streaming_answer_is_flushed_about_once_a_second(tmp_path):
    """Measures the flush interval a reader sees while an answer streams at ~50 tokens/s.

    The bounds hold on a machine four times overloaded: a write never comes sooner than a
    second after the last one (the writer waits that long), so there are at most as many as
    whole seconds passed; a late wake-up or a slow disk only delays one, by far less than the
    1.5 s of slack allowed, while a reader polling every 10 ms sees each within 0.5 s."""
    path = tmp_path / "history.db"
    store = Store.open(path)
    c = store.create_conversation()
    store.add_message(c.id, "user", "count")
    began = time.monotonic()
    writer = store.start_answer(c.id)
    reader = sqlite3.connect(path)
    seen: list[tuple[float, int]] = []  # (time, length on disk) at each change
    stop = threading.Event()

    def produce() -> None:
        while not stop.is_set():
            writer.append("x", 1)
            time.sleep(0.02)  # pacing a producer, not synchronisation

    producer = threading.Thread(target=produce)
    start = time.monotonic()
    producer.start()
    try:
        while time.monotonic() - start < 3.6:
            sql = "SELECT length(content) FROM messages WHERE role = 'assistant'"
            n = reader.execute(sql).fetchone()[0]
            if not seen or n != seen[-1][1]:
                seen.append((time.monotonic() - start, n))
            time.sleep(0.01)
    finally:
        stop.set()
        producer.join()
    timed, elapsed = writer.flushes, time.monotonic() - began
    writer.finish("interrupted")
    gaps = [b[0] - a[0] for a, b in zip(seen[1:], seen[2:])]
    assert 2 <= timed <= elapsed / writer.interval
    assert gaps and max(gaps) < 2.5 and min(gaps) > 0.5, seen
    print(f"flush gaps seen by a reader: {[round(g, 2) for g in gaps]} s")
    reader.close()
    store.close()


def test_writer_reports_a_read_only_database_and_recovers(store):
    """`PRAGMA query_only` makes SQLite refuse writes as a read-only file would (SQLITE_READONLY),
    also for root, who ignores file modes."""
    c = store.create_conversation()
    store.add_message(c.id, "user", "q")
    errors = []
    writer = store.start_answer(c.id, on_error=errors.append)
    writer.append("first ", [1])
    assert writer.flush()
    store._db.execute("PRAGMA query_only = ON")
    writer.append("second", [2])
    assert not writer.flush()
    assert "readonly" in str(writer.error) and errors == [writer.error]
    assert "\n" not in str(writer.error)
    with pytest.raises(StoreError, match="readonly"):
        store.add_message(c.id, "user", "q2")
    writer.append(" third", [3])  # generation goes on
    store._db.execute("PRAGMA query_only = OFF")
    assert writer.finish("stop", {"prompt_tokens": 4, "generated_tokens": 3}) is None
    answer = store.branch(c.id)[-1]
    assert answer.content == "first second third" and answer.tokens == [1, 2, 3]
    assert answer.finish_reason == "stop" and answer.answer_tokens == 3


def test_a_locked_database_is_one_line_and_the_writer_catches_up(tmp_path):
    path = tmp_path / "history.db"
    store = Store.open(path, timeout=0.1)
    c = store.create_conversation()
    writer = store.start_answer(c.id)
    writer.append("kept", [1])
    other = sqlite3.connect(path, isolation_level=None)
    other.execute("BEGIN EXCLUSIVE")
    try:
        with pytest.raises(StoreError, match="locked.*try again"):
            store.add_message(c.id, "user", "blocked")
        assert not writer.flush() and "locked" in str(writer.error)
    finally:
        other.execute("ROLLBACK")
        other.close()
    assert writer.finish("stop") is None
    assert store.branch(c.id)[-1].content == "kept"
    store.close()


def test_an_unusable_path_is_one_line(tmp_path):
    (tmp_path / "file").write_text("")
    with pytest.raises(StoreError, match="cannot create the history directory"):
        Store.open(tmp_path / "file" / "history.db")
    (tmp_path / "dir.db").mkdir()  # the database path is a directory: fails for root too
    with pytest.raises(StoreError, match="unable to open"):
        Store.open(tmp_path / "dir.db")
    (tmp_path / "junk.db").write_bytes(b"not a database" * 100)
    with pytest.raises(StoreError, match="not a database"):
        Store.open(tmp_path / "junk.db")


def test_finish_with_the_engines_answer_replaces_the_streamed_one(store):
    c = store.create_conversation()
    writer = store.start_answer(c.id)
    writer.append("Hal", [10])
    writer.finish("interrupted", tokens=[10, 11, 2], text="Hallo")
    answer = store.message(writer.message_id)
    assert (answer.content, answer.tokens) == ("Hallo", [10, 11, 2])
    with pytest.raises(RuntimeError):
        writer.append("late", [3])


def test_the_store_works_from_a_worker_thread(store):
    c = store.create_conversation()
    result = []

    def worker() -> None:
        store.add_message(c.id, "user", "from a thread")
        w = store.start_answer(c.id)
        w.append("answer", [1])
        result.append(w.finish("stop"))

    t = threading.Thread(target=worker)
    t.start()
    t.join()
    assert result == [None]
    assert [m.content for m in store.branch(c.id)] == ["from a thread", "answer"]


FULL_DISK = """
    import json, resource, signal, sys
    from apertus_mlx.store import Store
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    path = sys.argv[1]
    store = Store.open(path)
    c = store.create_conversation()
    store.add_message(c.id, "user", "fill the disk")
    writer = store.start_answer(c.id)
    writer.append("saved before the disk filled. ", [1])
    assert writer.flush()
    sizes = [p.stat().st_size for p in __import__("pathlib").Path(path).parent.iterdir()]
    resource.setrlimit(resource.RLIMIT_FSIZE, (max(sizes), resource.RLIM_INFINITY))
    writer.append("x" * 1_000_000, [2])
    flushed = writer.flush()
    writer.append(" still generating", [3])  # does not raise
    error = writer.finish("stop")
    print(json.dumps({"flushed": flushed, "error": str(error), "answer": c.id}))
"""


def test_a_full_disk_is_reported_and_loses_only_the_unwritten_part(tmp_path):
    """RLIMIT_FSIZE stands in for a full disk: writes past the limit fail with EFBIG, which
    SQLite reports as it would a full disk; the earlier answer text stays intact."""
    path = tmp_path / "history.db"
    out = run_python(FULL_DISK, str(path))
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout)
    assert result["flushed"] is False
    assert "full" in result["error"], result
    assert "\n" not in result["error"]
    assert integrity(path) == "ok"
    with Store.open(path) as store:
        answer = store.branch(result["answer"])[-1]
        assert answer.content == "saved before the disk filled. " and answer.finish_reason is None


# -- several processes ------------------------------------------------------------------------

WRITER = """
    import os, sys, time
    from apertus_mlx.store import Store
    path, name, go, turns = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
    deadline = time.monotonic() + 60
    while not os.path.exists(go):  # start together with the others
        assert time.monotonic() < deadline
        time.sleep(0.005)
    store = Store.open(path)  # all three create and migrate the same new file at once
    c = store.create_conversation(model=name)
    for i in range(turns):
        store.add_message(c.id, "user", f"{name} question {i}")
        writer = store.start_answer(c.id, interval=0.01)
        for j in range(5):
            writer.append(f"{name}-{i}-{j} ", [i, j])
            writer.flush()
        assert writer.finish("stop", {"generated_tokens": 5}) is None, writer.error
    print(c.id)
"""


def test_three_processes_writing_at_once_lose_nothing(tmp_path):
    path, go, turns = tmp_path / "history.db", tmp_path / "go", 25
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", textwrap.dedent(WRITER), str(path), name, str(go), str(turns)],
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for name in ("chat-a", "chat-b", "generate")
    ]
    go.write_text("")
    outs = [p.communicate(timeout=120) for p in procs]
    assert all(p.returncode == 0 for p in procs), [o[1] for o in outs]
    assert integrity(path) == "ok"
    with Store.open(path) as store:
        assert len(store.list_conversations()) == 3
        for name, (cid, _) in zip(("chat-a", "chat-b", "generate"), outs):
            branch = store.branch(cid.strip())
            assert len(branch) == 2 * turns
            for i in range(turns):
                q, a = branch[2 * i], branch[2 * i + 1]
                assert q.content == f"{name} question {i}"
                assert a.content == "".join(f"{name}-{i}-{j} " for j in range(5))
                assert a.tokens == [x for j in range(5) for x in (i, j)]
                assert a.finish_reason == "stop"
            assert len(store.search(name.split("-")[-1])) >= turns


# -- damaged rows and read-only opening --------------------------------------------------------


def _damage(path: Path, sql: str, *args) -> None:
    """Change a row behind the store's back, as another tool, a bad disk or a hand edit might."""
    db = sqlite3.connect(path, isolation_level=None)
    db.execute(sql, args)
    db.close()


def _three_conversations(store: Store) -> list[str]:
    ids = []
    for title in ("first", "damaged", "third"):
        c = store.create_conversation(title=title, settings={"temperature": 0})
        store.add_message(c.id, "user", f"question of {title}")
        store.add_message(c.id, "assistant", f"answer of {title}", tokens=[5, 6, 7])
        ids.append(c.id)
    return ids


@pytest.mark.parametrize(
    "damage, reason",
    [
        ("UPDATE conversations SET settings = '{not json' WHERE id = ?", "settings are not JSON"),
        ("UPDATE conversations SET settings = '[1, 2]' WHERE id = ?", "not a JSON object"),
        ("UPDATE conversations SET settings = ? WHERE id = ?", "settings are not JSON"),
        ("UPDATE conversations SET thinking = 'maybe' WHERE id = ?", "thinking is not a whole"),
        (
            "UPDATE messages SET tokens = x'0102030405' WHERE conversation_id = ?",
            "token ids are damaged",
        ),
        (
            "UPDATE messages SET stats = '{' WHERE role = 'assistant' AND conversation_id = ?",
            "stats are not JSON",
        ),
        (
            "UPDATE messages SET content = CAST(x'6869ff' AS TEXT) WHERE conversation_id = ?",
            "content is not valid UTF-8",
        ),
    ],
)
def test_a_damaged_row_is_shown_as_damaged_and_the_rest_reads_as_usual(tmp_path, damage, reason):
    path = tmp_path / "history.db"
    with Store.open(path) as store:
        first, damaged, third = _three_conversations(store)
    args = ("[" * 100_000, damaged) if damage.count("?") == 2 else (damaged,)
    _damage(path, damage, *args)
    with Store.open(path, readonly=True) as store:
        listed = {c.id: c for c in store.list_conversations()}
        assert set(listed) == {first, damaged, third}
        assert listed[first].damaged is None and listed[third].damaged is None
        assert [m.content for m in store.branch(third)] == ["question of third", "answer of third"]
        assert store.branch(third)[1].tokens == [5, 6, 7]
        c = store.get_conversation(damaged)
        messages = store.branch(damaged) + store.messages(damaged)
        found = [c.damaged or ""] + [m.damaged or "" for m in messages]
        assert any(reason in note for note in found), found
        assert isinstance(c.settings, dict) and len(store.branch(damaged)) == 2
        for m in messages:  # what stands in for a damaged value is the schema's own kind
            assert m.tokens is None or m.tokens == [5, 6, 7]
            assert isinstance(m.content, str) and m.content.encode("utf-8")
        for hit in store.search("hi") + store.search("answer"):  # printable, whatever was stored
            assert hit.snippet.encode("utf-8") and (hit.title or "").encode("utf-8")


def test_parents_that_loop_end_the_branch_instead_of_hanging(tmp_path):
    path = tmp_path / "history.db"
    with Store.open(path) as store:
        c = store.create_conversation()
        q = store.add_message(c.id, "user", "q")
        a = store.add_message(c.id, "assistant", "a")
    _damage(path, "UPDATE messages SET parent_id = ? WHERE id = ?", a.id, q.id)
    with Store.open(path, readonly=True) as store:
        assert len(store.branch(c.id)) <= 2
        assert store.latest_leaf(q.id) in (q.id, a.id)


def test_a_reader_does_not_wait_for_a_writer(tmp_path):
    """While another process holds a write transaction, a read-only open reads what is
    committed; the read-write open (which migrates) waited and failed with "locked"."""
    path = tmp_path / "history.db"
    with Store.open(path) as store:
        store.create_conversation(title="committed")
    writer = sqlite3.connect(path, isolation_level=None)
    writer.execute("BEGIN IMMEDIATE")
    writer.execute("UPDATE conversations SET title = 'not yet'")
    try:
        with pytest.raises(StoreError, match="locked"):
            Store.open(path, timeout=0.1)
        with Store.open(path, readonly=True, timeout=0.1) as store:
            assert [c.title for c in store.list_conversations()] == ["committed"]
            assert store.search("committed")
            with pytest.raises(StoreError, match="readonly"):  # and it never writes
                store.create_conversation()
    finally:
        writer.execute("ROLLBACK")
        writer.close()


def test_reading_a_missing_history_creates_nothing(tmp_path):
    path = tmp_path / "none" / "history.db"
    with Store.open(path, readonly=True) as store:
        assert store.list_conversations() == [] and store.search("x") == []
        with pytest.raises(UnknownConversationError):
            store.get_conversation("abcd")
    assert not path.parent.exists()
    (tmp_path / "file").write_text("")
    with pytest.raises(StoreError, match="history directory .* not a directory"):
        Store.open(tmp_path / "file" / "history.db", readonly=True)


@pytest.mark.parametrize("version", range(SCHEMA_VERSION))
def test_reading_an_older_schema_upgrades_it_once(tmp_path, version):
    path = tmp_path / "history.db"
    _old_database(path, version)
    with Store.open(path, readonly=True) as store:
        if version >= 1:
            assert [c.id for c in store.list_conversations()] == ["0123abcd"]
            assert {h.message_id for h in store.search("gruyere")} == {2}
    db = sqlite3.connect(path)
    assert db.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
    db.close()


def test_reading_a_newer_schema_is_refused_in_one_line(tmp_path):
    path = tmp_path / "history.db"
    Store.open(path).close()
    _damage(path, f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    with pytest.raises(StoreError, match="newer than this apertus-mlx"):
        Store.open(path, readonly=True)
