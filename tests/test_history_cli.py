"""`apertus-mlx history ...` and `generate --save/--continue` as a user runs them: real processes,
a real store under APERTUS_MLX_HOME, and a real kill in the middle of an answer."""

from __future__ import annotations

import json
import os
import resource
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from apertus_mlx.prompt import conversation_ids
from apertus_mlx.store import Store
from apertus_mlx.tokenizer import load_tokenizer
from tests.checkpoints import cli, finish, stream_generate


@pytest.fixture
def home(tmp_path, monkeypatch):
    home = tmp_path / "home"
    monkeypatch.setenv("APERTUS_MLX_HOME", str(home))
    monkeypatch.delenv("APERTUS_MLX_MODEL", raising=False)
    return home


def one_line_error(out: subprocess.CompletedProcess, code: int, text: str) -> None:
    assert out.returncode == code, (out.stdout, out.stderr)
    assert "Traceback" not in out.stderr
    lines = [line for line in out.stderr.strip().splitlines() if not line.startswith("[stopped")]
    assert len(lines) == 1 and lines[0].startswith("apertus-mlx: error:") and text in lines[0]


def integrity(path) -> str:
    db = sqlite3.connect(path)
    try:
        return db.execute("PRAGMA integrity_check").fetchone()[0]
    finally:
        db.close()


def test_save_then_continue_then_read_export_and_delete(home, tiny_model_dir, tmp_path):
    model = str(tiny_model_dir)
    first = cli("generate", "Grüezi mitenand!", "-m", model, "--temp", "0", "-n", "8", "--json")
    assert first.returncode == 0 and "conversation_id" not in first.stdout  # nothing saved
    assert not (home / "history.db").exists()

    out = cli("generate", "Grüezi mitenand!", "-m", model, "--temp", "0", "-n", "8", "--save")
    assert out.returncode == 0, out.stderr
    cid = out.stderr.split("saved as ")[1].split()[0]
    assert len(cid) == 8
    assert out.stdout.rstrip("\n") == json.loads(first.stdout)["text"]

    # --continue: no -m (a model in the environment does not override the conversation's),
    # temperature 0 and the 8-token limit come from the conversation
    turn = cli(
        "generate", "Und wie gaht's?", "--continue", cid[:4], "--json",
        env={"APERTUS_MLX_MODEL": "/no/such/model"},
    )  # fmt: skip
    assert turn.returncode == 0, turn.stderr
    second = json.loads(turn.stdout)
    assert second["conversation_id"] == cid and second["generated_tokens"] == 8
    tokenizer = load_tokenizer(tiny_model_dir)
    with Store.open(home / "history.db") as store:
        produced = store.branch(cid)[1].tokens
    assert len(produced) == 8
    expected = conversation_ids(
        tokenizer,
        [
            {"role": "user", "content": "Grüezi mitenand!"},
            {"role": "assistant", "content": json.loads(first.stdout)["text"], "tokens": produced},
            {"role": "user", "content": "Und wie gaht's?"},
        ],
    )
    # the prompt is the saved branch, its answer as the tokens produced, + the new turn
    assert expected.token_exact and second["prompt_tokens"] == len(expected.ids)

    with Store.open(home / "history.db") as store:
        c = store.get_conversation(cid)
        assert c.model == str(tiny_model_dir) and c.revision is None
        assert c.settings["temperature"] == 0 and c.settings["max_tokens"] == 8
        branch = store.branch(cid)
        assert [m.role for m in branch] == ["user", "assistant", "user", "assistant"]
        assert branch[3].content == second["text"] and branch[3].finish_reason == "length"
        assert len(branch[3].tokens) == 8 and branch[3].prompt_tokens == len(expected.ids)

    listing = json.loads(cli("history", "list", "--json").stdout)
    assert [c["id"] for c in listing] == [cid] and listing[0]["title"] == "Grüezi mitenand!"
    assert cid in cli("history", "list").stdout

    shown = cli("history", "show", cid)
    assert shown.returncode == 0
    assert "## User\n\nUnd wie gaht's?" in shown.stdout and "cut at the token limit" in shown.stdout

    found = cli("history", "search", "gaht's")
    assert found.returncode == 0 and cid in found.stdout and "[gaht's]" in found.stdout
    weird = cli("history", "search", 'NEAR("x" OR', "*")
    assert weird.returncode == 0 and "Traceback" not in weird.stderr

    md = cli("history", "export", cid)
    assert md.returncode == 0 and md.stdout == shown.stdout
    target = tmp_path / "out.json"
    saved = cli("history", "export", cid[:6], "--format", "json", "-o", str(target))
    assert saved.returncode == 0 and str(target) in saved.stderr
    exported = json.loads(target.read_text(encoding="utf-8"))
    assert exported["conversation"]["id"] == cid and len(exported["messages"]) == 4
    assert exported["messages"][1]["tokens"] == branch[1].tokens

    assert cli("history", "rename", cid, "Begrüssung").returncode == 0
    assert "# Begrüssung" in cli("history", "show", cid).stdout

    kept = cli("history", "rm", cid, stdin="n\n")
    question, error = kept.stderr.strip().splitlines()
    assert question.startswith(f"Delete conversation {cid} (Begrüssung)?")
    assert kept.returncode == 1 and error == "apertus-mlx: error: nothing deleted"
    assert cli("history", "rm", cid, stdin="").returncode == 1  # no answer: no deletion
    assert cli("history", "list", "--json").stdout.strip() != "[]"
    gone = cli("history", "rm", cid, "--yes")
    assert gone.returncode == 0 and f"deleted {cid}" in gone.stderr
    assert json.loads(cli("history", "list", "--json").stdout) == []


@pytest.mark.parametrize(
    "args, message",
    [
        (("history", "show", "ffffffff"), "no conversation 'ffffffff'"),
        (("history", "show", "ab"), "unique prefix of 4 or more"),
        (("history", "export", "ffff"), "no conversation"),
        (("history", "rm", "ffff", "--yes"), "no conversation"),
        (("generate", "hi", "--continue", "ffff"), "no conversation"),
        (("generate", "hi"), "no model given"),
        (
            ("generate", "hi", "-m", "{model}", "--save", "--no-chat-template"),
            "drop --no-chat-template",
        ),
    ],
)
def test_unknown_ids_and_bad_usage_are_one_line_and_exit_2(home, tiny_model_dir, args, message):
    one_line_error(cli(*(a.format(model=tiny_model_dir) for a in args)), 2, message)


def test_an_unusable_store_still_shows_the_answer(tmp_path, tiny_model_dir):
    """APERTUS_MLX_HOME is a file: nothing can be created there, whoever runs the test."""
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("")
    env = {"APERTUS_MLX_HOME": str(blocker)}
    args = ("generate", "Hallo", "-m", str(tiny_model_dir), "--temp", "0", "-n", "5")
    plain = cli(*args)
    out = cli(*args, "--save", "--json", env=env)
    one_line_error(out, 1, "history not saved: cannot create the history directory")
    result = json.loads(out.stdout)
    assert result["text"] == plain.stdout.rstrip("\n") and result["conversation_id"] is None
    one_line_error(cli("history", "list", env=env), 1, "history directory")
    continued = cli("generate", "hi", "--continue", "abcd", env=env)  # nothing to continue from
    one_line_error(continued, 1, "cannot create the history directory")


def test_a_full_disk_still_shows_the_answer(home, tiny_model_dir):
    """RLIMIT_FSIZE (with SIGXFSZ ignored) stands in for a full disk: every write past the
    history file's current size fails, as on a full disk, even for root."""
    Store.open(home / "history.db").close()
    limit = max(p.stat().st_size for p in home.iterdir())

    def limit_writes() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, resource.RLIM_INFINITY))

    args = ("generate", "Hallo", "-m", str(tiny_model_dir), "--temp", "0", "-n", "5")
    plain = cli(*args)
    out = cli(*args, "--save", preexec_fn=limit_writes)
    one_line_error(out, 1, "history not saved")
    assert "full" in out.stderr or "disk I/O" in out.stderr
    assert out.stdout == plain.stdout and plain.stdout.strip()
    assert integrity(home / "history.db") == "ok"


def test_sigkill_mid_answer_keeps_the_database_and_all_but_the_last_second(home, endless_model):
    """Kills `generate --save` while it streams; measures how often the answer reached the disk
    and how much of what was on the screen the kill lost."""
    proc = stream_generate(endless_model, "--save")
    shown: list[str] = []
    reader = threading.Thread(target=lambda: shown.extend(iter(lambda: proc.stdout.read(1), "")))
    reader.start()
    path = home / "history.db"
    changes: list[tuple[float, int]] = []  # (time, answer length on disk) when it changed
    deadline = time.monotonic() + 90
    try:
        while len(changes) < 4:  # wait until the answer has been flushed a few times
            assert time.monotonic() < deadline and proc.poll() is None, proc.stderr.read()
            try:
                db = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
                row = db.execute("SELECT length(content) FROM messages WHERE role = 'assistant'")
                row = row.fetchone()
                db.close()
            except sqlite3.OperationalError:  # not created yet
                row = None
            if row and row[0] and (not changes or row[0] != changes[-1][1]):
                changes.append((time.monotonic(), row[0]))
            time.sleep(0.02)
        # kill just before the next flush is due: the worst moment, to measure the most lost
        time.sleep(max(0.0, changes[-1][0] + 0.95 - time.monotonic()))
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        proc.kill()
        reader.join(timeout=30)
    assert proc.returncode == -signal.SIGKILL
    assert integrity(path) == "ok"
    screen = "".join(shown)
    with Store.open(path) as store:
        (c,) = store.list_conversations()
        user, answer = store.branch(c.id)
        assert user.content == "Erzähl mir alles." and answer.finish_reason is None
        assert answer.content and screen.startswith(answer.content)
        assert len(answer.tokens) > 0
    gaps = [b[0] - a[0] for a, b in zip(changes, changes[1:])]
    lost = len(screen) - len(answer.content)
    # characters a second at the end (decoding slows as the context grows)
    per_second = (changes[-1][1] - changes[-2][1]) / max(changes[-1][0] - changes[-2][0], 1e-9)
    print(
        f"\nflushes every {min(gaps):.2f}-{max(gaps):.2f} s; the kill lost {lost} of "
        f"{len(screen)} characters shown ({lost / per_second:.2f} s of streaming)"
    )
    # Flushes are due every second; the slack (to 3 s) holds on a machine four times
    # overloaded, where a write or the reader's poll can come late.
    assert max(gaps) < 3.0
    assert lost <= 3.0 * per_second


def test_ctrl_c_saves_the_answer_as_interrupted(home, endless_model):
    proc = stream_generate(endless_model, "--save")
    try:
        first = proc.stdout.read(1)  # the answer is streaming
        proc.send_signal(signal.SIGINT)
        rest, stderr = finish(proc, 60)
    finally:
        proc.kill()
    assert first and proc.returncode == 130, stderr
    assert "Traceback" not in stderr and "saved as" in stderr
    with Store.open(home / "history.db") as store:
        (c,) = store.list_conversations()
        answer = store.branch(c.id)[-1]
    assert answer.finish_reason == "interrupted"
    shown = (first + rest).removesuffix("\n")
    assert shown and answer.content.startswith(shown)  # and what was generated, shown or not
    assert answer.answer_tokens == len(answer.tokens) > 0


def _saved_conversations(home, tiny_model_dir, n: int) -> list[str]:
    ids = []
    for i in range(n):
        out = cli("generate", f"Frage {i}", "-m", str(tiny_model_dir), "--temp", "0", "-n", "4",
                  "--save")  # fmt: skip
        assert out.returncode == 0, out.stderr
        ids.append(out.stderr.split("saved as ")[1].split()[0])
    return ids


@pytest.mark.parametrize(
    "damage, reason",
    [
        ("UPDATE conversations SET settings = '{oops' WHERE id = ?", "settings are not JSON"),
        ("UPDATE messages SET tokens = x'010203' WHERE conversation_id = ?", "token ids"),
    ],
)
def test_one_damaged_row_is_shown_as_damaged_and_nothing_else_fails(
    home, tiny_model_dir, tmp_path, damage, reason
):
    """Non-JSON settings or an odd-length token blob in one row made `history list` (of every
    conversation), `show`, `export` and `--continue` all fail with an internal error."""
    good, bad = _saved_conversations(home, tiny_model_dir, 2)
    db = sqlite3.connect(home / "history.db", isolation_level=None)
    db.execute(damage, (bad,))
    db.close()

    listing = cli("history", "list")
    assert listing.returncode == 0, listing.stderr
    assert good in listing.stdout and bad in listing.stdout
    if "conversations" in damage:  # the list shows conversations; a message's damage: `show`
        (bad_line,) = [line for line in listing.stdout.splitlines() if bad in line]
        assert f"[damaged: {reason}]" in bad_line
        as_json = {c["id"]: c for c in json.loads(cli("history", "list", "--json").stdout)}
        assert as_json[bad]["damaged"] == reason and as_json[good]["damaged"] is None
    assert listing.stdout.count("damaged") == ("conversations" in damage)

    shown = cli("history", "show", bad)
    assert shown.returncode == 0 and "## User\n\nFrage" in shown.stdout
    assert f"damaged: {reason}" in shown.stdout
    assert cli("history", "export", bad, "--format", "json").returncode == 0
    turn = cli("generate", "Und weiter?", "--continue", bad, "--json")
    assert turn.returncode == 0, turn.stderr
    assert json.loads(turn.stdout)["conversation_id"] == bad
    with Store.open(home / "history.db") as store:  # the new turn is stored under it
        assert [m.role for m in store.branch(bad)] == ["user", "assistant"] * 2


def test_reads_do_not_wait_for_a_writer(home, tiny_model_dir):
    """Another process holds a write transaction (a chat storing an answer): `history list`
    and `search` failed after 5 s with "database is locked"; they read what is committed."""
    (cid,) = _saved_conversations(home, tiny_model_dir, 1)
    writer = sqlite3.connect(home / "history.db", isolation_level=None)
    writer.execute("BEGIN IMMEDIATE")
    writer.execute("UPDATE conversations SET title = 'uncommitted'")
    try:
        listing = cli("history", "list")
        assert listing.returncode == 0 and cid in listing.stdout, listing.stderr
        assert "uncommitted" not in listing.stdout
        found = cli("history", "search", "Frage")
        assert found.returncode == 0 and cid in found.stdout, found.stderr
        assert cli("history", "show", cid).returncode == 0
    finally:
        writer.execute("ROLLBACK")
        writer.close()


def read_only(directory) -> list[str]:
    """A command prefix that runs a process with `directory` read-only for it: a read-only
    bind mount in a private mount namespace (root, who ignores file modes), else chmod."""
    if os.geteuid() != 0:
        directory.chmod(0o555)
        return []
    probe = subprocess.run(["unshare", "--mount", "true"], capture_output=True)
    if probe.returncode != 0:
        pytest.skip("root without mount namespaces: cannot make a directory read-only")
    script = 'mount --bind "$1" "$1" && mount -o remount,bind,ro "$1" && shift && exec "$@"'
    return ["unshare", "--mount", "sh", "-c", script, "sh", str(directory)]


def test_reads_work_in_a_read_only_directory(home, tiny_model_dir):
    """They failed with "attempt to write a readonly database" (the open migrated)."""
    (cid,) = _saved_conversations(home, tiny_model_dir, 1)
    prefix = read_only(home)
    try:
        for args in (("list",), ("search", "Frage"), ("show", cid), ("export", cid)):
            out = subprocess.run(
                [*prefix, sys.executable, "-m", "apertus_mlx", "history", *args],
                capture_output=True, text=True, timeout=60,
                env={**os.environ, "PYTHONIOENCODING": "utf-8"},
            )  # fmt: skip
            assert out.returncode == 0 and cid in out.stdout + out.stderr, (args, out.stderr)
            assert out.stderr == "" or args == ("export", cid)
        writing = subprocess.run(
            [*prefix, sys.executable, "-m", "apertus_mlx", "history", "rename", cid, "x"],
            capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        one_line_error(writing, 1, "history database")
    finally:
        home.chmod(0o700)


def test_a_failed_export_leaves_the_old_file_and_no_new_one(home, tiny_model_dir, tmp_path):
    """RLIMIT_FSIZE stands in for a disk that fills mid-write: the export used to truncate the
    old file and leave part of the new export in it (or an empty new file)."""
    (cid,) = _saved_conversations(home, tiny_model_dir, 1)
    with Store.open(home / "history.db") as store:
        store.add_message(cid, "user", "lang " * 40_000)  # a 200 KB export
    old = tmp_path / "existing.md"
    old.write_text("the old export\n" * 6000)  # 90 KB
    before = old.read_bytes()
    new = tmp_path / "new.md"

    def limit_writes() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (100_000, resource.RLIM_INFINITY))

    for target in (old, new):
        out = cli("history", "export", cid, "-o", str(target), preexec_fn=limit_writes)
        one_line_error(out, 1, f"cannot write {target}")
    assert old.read_bytes() == before and not new.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["existing.md", "home"]  # no debris
    done = cli("history", "export", cid, "-o", str(old))
    assert done.returncode == 0 and old.read_text().startswith("# Frage 0")


def test_an_atomic_export_keeps_links_modes_and_devices(tmp_path):
    from apertus_mlx.export import write_atomically

    real = tmp_path / "real.md"
    real.write_text("old")
    real.chmod(0o640)
    link = tmp_path / "link.md"
    link.symlink_to(real)
    write_atomically(link, "new")
    assert link.is_symlink() and real.read_text() == "new"
    assert real.stat().st_mode & 0o777 == 0o640
    write_atomically(Path(os.devnull), "gone")  # written to, not replaced by a file
    assert Path(os.devnull).is_char_device()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["link.md", "real.md"]
