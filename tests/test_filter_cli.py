"""`apertus-mlx filter ...` and the filter inside `generate`, as a user runs them."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from datetime import date

import pytest

from apertus_mlx.output_filter import MARKER, phrase_digest, words
from tests.checkpoints import cli


@pytest.fixture
def home(tmp_path, monkeypatch):
    """An empty data directory, so no filter of the developer's leaks into the test."""
    path = tmp_path / "home"
    monkeypatch.setenv("APERTUS_MLX_HOME", str(path))
    return path


def write_filter(path, phrases, max_words=2, published="2026-01-01", **extra) -> str:
    doc = {
        "version": "test",
        "published": published,
        "algorithm": "sha256",
        "normalization": "nfkc-casefold-words",
        "max_words": max_words,
        "entries": [phrase_digest(p) for p in phrases],
        **extra,
    }
    path.write_text(json.dumps(doc), encoding="utf-8")
    return str(path)


def test_generate_drops_words_the_filter_lists(tiny_model_dir, home, tmp_path):
    args = ("generate", "Grüezi mitenand!", "-m", str(tiny_model_dir), "--temp", "0", "-n", "24")
    plain = cli(*args)
    assert plain.returncode == 0, plain.stderr
    said = words(plain.stdout)
    assert len(said) >= 3, plain.stdout
    # one single word and one two-word phrase the model really says
    phrases = [said[1], " ".join(said[-2:])]
    gone = {said[1], *said[-2:]}
    assert cli("filter", "install", write_filter(tmp_path / "f.json", phrases)).returncode == 0

    filtered = cli(*args)
    assert filtered.returncode == 0, filtered.stderr
    assert MARKER in filtered.stdout
    assert not gone & set(words(filtered.stdout))
    assert filtered.stdout.replace(MARKER, "") != plain.stdout

    as_json = json.loads(cli(*args, "--json").stdout)
    assert as_json["text"] + "\n" == filtered.stdout

    off = cli(*args, "--no-output-filter")
    assert off.stdout == plain.stdout
    assert "output filter off for this run" in off.stderr


def test_install_status_apply_rm(home, tmp_path):
    src = write_filter(tmp_path / "f.json", ["Anna Muster", "Zürich"], patterns=[r"\d{4}"])
    out = cli("filter", "install", src)
    assert out.returncode == 0, out.stderr
    assert "2 entries" in out.stdout and (home / "output-filter.bin").exists()
    status = json.loads(cli("filter", "status", "--json").stdout)
    assert status["installed"] and status["entries"] == 2 and status["published"] == "2026-01-01"
    assert status["patterns"] == 1 and status["age_days"] >= 0
    text = "Anna  MUSTER lives in ZU\u0308RICH since 1999.\n"
    applied = cli("filter", "apply", "-", stdin=text)
    assert applied.stdout == f"{MARKER} lives in {MARKER} since {MARKER}.\n"
    (tmp_path / "answer.txt").write_text(text, encoding="utf-8")
    assert cli("filter", "apply", str(tmp_path / "answer.txt")).stdout == applied.stdout
    assert "removed" in cli("filter", "rm").stdout
    assert not (home / "output-filter.bin").exists()
    assert not json.loads(cli("filter", "status", "--json").stdout)["installed"]


def test_apply_with_a_filter_file_before_installing(home, tmp_path):
    src = write_filter(tmp_path / "f.json", ["Bern"])
    out = cli("filter", "apply", "-", "--filter", src, stdin="Bern, Bernd")
    assert out.stdout == f"{MARKER}, Bernd"
    none = cli("filter", "apply", "-", stdin="Bern")
    assert none.returncode == 2 and "no output filter installed" in none.stderr


@pytest.mark.parametrize(
    "doc, message",
    [
        ("{not json", "is not valid JSON"),
        ('{"version": 1}', "missing field(s) published, algorithm"),
        (None, "unknown algorithm 'sha1'"),
    ],
)
def test_install_refuses_a_bad_file_in_one_line(home, tmp_path, doc, message):
    path = tmp_path / "bad.json"
    if doc is None:
        write_filter(path, ["x"], algorithm="sha1")
    else:
        path.write_text(doc)
    out = cli("filter", "install", str(path))
    assert out.returncode == 2
    assert out.stderr.startswith("apertus-mlx: error: ") and message in out.stderr
    assert out.stderr.count("\n") == 1
    assert not (home / "output-filter.bin").exists()


def test_a_damaged_installed_filter_stops_generate(tiny_model_dir, home, tmp_path):
    cli("filter", "install", write_filter(tmp_path / "f.json", ["a", "b"]))
    path = home / "output-filter.bin"
    path.write_bytes(path.read_bytes()[:-3])
    out = cli("generate", "hi", "-m", str(tiny_model_dir), "-n", "2")
    assert out.returncode == 1 and out.stdout == ""
    assert "install it again" in out.stderr and "--no-output-filter" in out.stderr


def test_status_of_a_truncated_filter_says_it_is_unusable(home, tmp_path):
    """`generate` refuses a truncated filter; `status` used to read only its header and report
    "2 entries", exit 0."""
    cli("filter", "install", write_filter(tmp_path / "f.json", ["a", "b"]))
    path = home / "output-filter.bin"
    path.write_bytes(path.read_bytes()[:-3])
    for args in (("filter", "status"), ("filter", "status", "--json")):
        out = cli(*args)
        assert out.returncode == 1 and out.stdout == "", out.stdout
        assert out.stderr.count("\n") == 1 and "entries" not in out.stderr
        assert "unusable" in out.stderr and "truncated; install it again" in out.stderr


def test_a_pattern_installed_by_an_older_version_is_named_by_status_and_generate(
    tiny_model_dir, home, tmp_path
):
    """Installed before patterns ran on RE2: a look-behind is refused with that reason, by
    `status` and `generate` alike (not "damaged": installing the same file again would fail)."""
    from apertus_mlx.filter_format import FilterData, write_compiled

    old = FilterData("old", date(2026, 1, 1), 1, b"", patterns=(r"(?<=\+)\d+",))
    write_compiled(old, home / "output-filter.bin")
    status = cli("filter", "status")
    assert status.returncode == 1 and "patterns[0] uses look-behind" in status.stderr
    out = cli("generate", "hi", "-m", str(tiny_model_dir), "-n", "2")
    assert out.returncode == 1 and out.stdout == ""
    assert "patterns[0] uses look-behind" in out.stderr and "--no-output-filter" in out.stderr


def test_install_refuses_what_is_not_a_regular_file_at_once(home, tmp_path):
    """`/dev/zero` was read without end (2.9 GB after 7 s) and SIGTERM could not stop it."""
    out = cli("filter", "install", "/dev/zero", timeout=60)
    assert out.returncode == 2 and out.stderr.count("\n") == 1
    assert "/dev/zero is not a regular file" in out.stderr
    assert not (home / "output-filter.bin").exists()


def test_a_backtracking_pattern_cannot_stall_generate_or_apply(tiny_model_dir, home, tmp_path):
    """An installed `(.|.)*\\x01` made `generate` print nothing for 30 s, and `(a+)+$` never
    returned; with RE2 both cost what any pattern costs."""
    src = write_filter(tmp_path / "f.json", ["nobody"], patterns=["(.|.)*\x01", "(a+)+$"])
    assert cli("filter", "install", src).returncode == 0
    applied = cli("filter", "apply", "-", stdin="a" * 30 + "!", timeout=60)
    assert applied.returncode == 0 and applied.stdout == "a" * 30 + "!"
    args = ("generate", "Grüezi mitenand!", "-m", str(tiny_model_dir), "--temp", "0", "-n", "24")
    out = cli(*args, timeout=120)
    plain = cli(*args, "--no-output-filter")
    assert out.returncode == 0 and out.stdout == plain.stdout and out.stdout.strip()


def test_models_says_once_when_the_filter_is_missing_or_old(home, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    missing = cli("models")
    assert missing.stderr.count("no output filter installed") == 1
    assert "huggingface.co/swiss-ai" in missing.stderr
    cli("filter", "install", write_filter(tmp_path / "old.json", ["x"], published="2020-01-01"))
    old = cli("models", "--json")
    assert old.stderr.count("every six months") == 1
    assert all(json.loads(line) for line in old.stdout.splitlines())  # stdout stays JSON


def test_generate_without_a_filter_does_not_import_the_matcher(home):
    code = (
        "import sys\n"
        "import apertus_mlx.commands.generate, apertus_mlx.turn\n"
        "from apertus_mlx.commands.filter import output_filter\n"
        "assert output_filter(disabled=False) is None\n"
        "assert 'apertus_mlx.output_filter' not in sys.modules\n"
    )
    out = subprocess.run([sys.executable, "-c", code], env=os.environ, capture_output=True)
    assert out.returncode == 0, out.stderr


def test_the_history_keeps_only_the_filtered_answer(tiny_model_dir, home, tmp_path):
    from apertus_mlx.store import Store

    args = ("-m", str(tiny_model_dir), "--temp", "0", "-n", "24")
    said = words(cli("generate", "Grüezi mitenand!", *args).stdout)
    cli("filter", "install", write_filter(tmp_path / "f.json", [said[-1]], max_words=1))
    out = cli("generate", "Grüezi mitenand!", *args, "--save", "--json")
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout)
    cid = result["conversation_id"]
    with Store.open(home / "history.db") as store:
        answer = store.branch(cid)[1]
    assert answer.content == result["text"] and MARKER in answer.content
    assert said[-1] not in words(answer.content)
    assert answer.tokens == []  # the ids would decode back to what was removed
    # the next turn reads the filtered text back (there are no tokens to stand in for it)
    turn = cli("generate", "Und?", "--continue", cid, "--json")
    assert turn.returncode == 0, turn.stderr


def test_ctrl_c_with_a_hostile_pattern_installed_keeps_the_answer(endless_model, home, tmp_path):
    """With `(.|.)*\\x01` installed, `generate` printed nothing for 30 s and, after Ctrl+C, the
    stored answer was empty with finish reason "error": the interrupt landed in the filter."""
    from apertus_mlx.store import Store
    from tests.checkpoints import finish, stream_generate

    src = write_filter(tmp_path / "f.json", ["nobody"], patterns=["(.|.)*\\x01", "(a+)+$"])
    assert cli("filter", "install", src).returncode == 0
    proc = stream_generate(endless_model, "--save")
    try:
        first = proc.stdout.read(1)  # the answer streams through the filter
        proc.send_signal(signal.SIGINT)
        rest, stderr = finish(proc, 60)
    finally:
        proc.kill()
    assert first and proc.returncode == 130, stderr
    with Store.open(home / "history.db") as store:
        (c,) = store.list_conversations()
        answer = store.branch(c.id)[-1]
    assert answer.finish_reason == "interrupted" and answer.content
