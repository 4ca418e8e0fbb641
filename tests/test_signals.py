"""SIGHUP (a closed terminal or ssh session) ends every command as SIGTERM does: the answer is
kept and stored as interrupted with its cache, a conversion's lock and unfinished folder are
removed, the chat restores the terminal; the exit status is 129. Real processes, real signals."""

from __future__ import annotations

import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import textwrap
import time
import uuid
from pathlib import Path

import pytest

from apertus_mlx.store import Store
from tests.checkpoints import finish, stream_generate

EXIT_HANGUP = 128 + signal.SIGHUP


@pytest.fixture
def home(tmp_path, monkeypatch):
    home = tmp_path / "home"
    monkeypatch.setenv("APERTUS_MLX_HOME", str(home))
    return home


def saved_caches(home: Path) -> list[Path]:
    return list(home.rglob("*.safetensors"))


def test_sighup_during_generate_save_keeps_the_answer_and_its_cache(home, endless_model):
    """It used to kill the process where it stood: the answer stayed "incomplete" (finish
    reason None) and no cache was saved."""
    proc = stream_generate(endless_model, "--save")
    try:
        first = proc.stdout.read(1)  # the answer is streaming
        proc.send_signal(signal.SIGHUP)
        rest, stderr = finish(proc, 60)
    finally:
        proc.kill()
    assert first and proc.returncode == EXIT_HANGUP, stderr
    assert "Traceback" not in stderr and "saved as" in stderr
    with Store.open(home / "history.db") as store:
        (c,) = store.list_conversations()
        answer = store.branch(c.id)[-1]
    assert answer.finish_reason == "interrupted" and answer.content.startswith(first + rest[:-1])
    assert saved_caches(home), "no KV cache saved"


def test_a_hangup_the_parent_ignores_stays_ignored(endless_model):
    """`nohup apertus-mlx generate ...` must survive the hangup it was started to survive."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "apertus_mlx", "generate", "Erzähl mir alles.", "-m",
         str(endless_model), "-n", "50000", "--temp", "0"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, encoding="utf-8",
        preexec_fn=lambda: signal.signal(signal.SIGHUP, signal.SIG_IGN),
    )  # fmt: skip
    try:
        proc.stdout.read(1)
        proc.send_signal(signal.SIGHUP)
        proc.stdout.read(200)  # still streaming after the hangup
        assert proc.poll() is None
        proc.send_signal(signal.SIGINT)
        proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 130


CONVERT_AND_WAIT = """
    import sys
    from apertus_mlx import quantize
    from apertus_mlx.cli import main

    real = quantize.save_weights

    def save_weights(*args, **kwargs):  # the unfinished folder holds weights now: stop here
        real(*args, **kwargs)
        print("written", flush=True)
        sys.stdin.read()  # until the signal

    quantize.save_weights = save_weights
    sys.argv = ["apertus-mlx", "convert", sys.argv[1], "--bits", "4", "--group-size", "32",
                "--out", sys.argv[2]]
    main()
"""


def test_sighup_during_convert_removes_the_lock_and_the_unfinished_folder(tiny_model_dir, tmp_path):
    """It used to leave `.q.lock` and a partial folder of weights until the next convert."""
    out = tmp_path / "q"
    proc = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(CONVERT_AND_WAIT), str(tiny_model_dir), str(out)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert proc.stdout.readline() == "written\n", proc.stderr.read()
        assert any(p.name.startswith(".q.") for p in tmp_path.iterdir())  # lock and partial
        proc.send_signal(signal.SIGHUP)
        _, stderr = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == EXIT_HANGUP, stderr
    assert "Traceback" not in stderr
    assert list(tmp_path.iterdir()) == [], list(tmp_path.iterdir())


# -- the chat, in a real terminal ---------------------------------------------------------------


def tmux(*args: str) -> str:
    out = subprocess.run(["tmux", *args], capture_output=True, text=True)
    return out.stdout.strip()


def answer_in_store(home: Path) -> tuple[str | None, int] | None:
    """(finish reason, characters) of the first answer on disk, or None before there is one."""
    try:
        db = sqlite3.connect(f"file:{home / 'history.db'}?mode=ro", uri=True)
        try:
            row = db.execute(
                "SELECT finish_reason, length(content) FROM messages WHERE role = 'assistant'"
            ).fetchone()
        finally:
            db.close()
    except sqlite3.OperationalError:  # not created yet
        return None
    return tuple(row) if row else None


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def wait_for(condition, what: str, timeout: float = 90.0):
    deadline = time.monotonic() + timeout
    while not (result := condition()):
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)
    return result


def start_chat_answering(endless_model: Path, home: Path) -> tuple[str, int]:
    """A chat in a tmux session, streaming an endless answer; (session, the chat's PID).

    The chat runs under a shell that writes its exit status to `home/exit-status`: tmux's own
    `pane_dead_status` stayed empty at times here (the server did not reap the chat)."""
    session = f"apertus-hup-{uuid.uuid4().hex[:8]}"
    exe = Path(sys.executable).with_name("apertus-mlx")
    command = str(exe) if exe.exists() else f"{sys.executable} -m apertus_mlx"
    env = f"APERTUS_MLX_HOME='{home}' HF_HUB_OFFLINE=1 TERM=xterm-256color"
    chat = f"env {env} {command} chat -m '{endless_model}' --temp 0 -n 50000"
    shell = f"{chat}; echo $? > '{home / 'exit-status'}'"
    subprocess.run(["tmux", "new-session", "-d", "-s", session, "-x", "100", "-y", "30", shell],
                   check=True)  # fmt: skip
    tmux("set-option", "-t", session, "remain-on-exit", "on")
    shell_pid = int(tmux("display", "-p", "-t", session, "#{pane_pid}"))
    children = Path(f"/proc/{shell_pid}/task/{shell_pid}/children")
    chat_pid = int(wait_for(lambda: children.read_text().split(), "the chat to start")[0])

    def loaded() -> bool:
        text = tmux("capture-pane", "-p", "-t", session)
        return Path(endless_model).name in text and "loading" not in text

    wait_for(loaded, "the model to load")
    tmux("send-keys", "-t", session, "Erzähl mir alles", "Enter")
    wait_for(lambda: (answer_in_store(home) or (None, 0))[1] > 0, "the answer to stream")
    return session, chat_pid


@pytest.mark.skipif(shutil.which("tmux") is None, reason="needs tmux")
def test_sighup_quits_the_chat_like_ctrl_q_and_restores_the_terminal(endless_model, tmp_path):
    """It used to kill the chat mid-answer (answer "incomplete", no cache) and leave the
    terminal on the alternate screen; SIGTERM aborted it ("terminate called without an active
    exception") as the model thread was still in MLX at exit."""
    home = tmp_path / "home"
    session, pid = start_chat_answering(endless_model, home)
    try:
        assert tmux("display", "-p", "-t", session, "#{alternate_on}") == "1"
        os.kill(pid, signal.SIGHUP)
        status_file = home / "exit-status"
        status = wait_for(lambda: status_file.exists() and status_file.read_text().strip(), "exit")
        assert status == str(EXIT_HANGUP), tmux("capture-pane", "-p", "-t", session)
        assert tmux("display", "-p", "-t", session, "#{alternate_on}") == "0"
    finally:
        tmux("kill-session", "-t", session)
    finish_reason, length = answer_in_store(home)
    assert finish_reason == "interrupted" and length > 0
    assert saved_caches(home), "no KV cache saved"


@pytest.mark.skipif(shutil.which("tmux") is None, reason="needs tmux")
def test_closing_the_chats_terminal_stores_the_answer_as_interrupted(endless_model, tmp_path):
    """A real hangup: the terminal goes away (tmux closes the pty and sends SIGHUP)."""
    home = tmp_path / "home"
    session, pid = start_chat_answering(endless_model, home)
    tmux("kill-session", "-t", session)
    wait_for(lambda: not alive(pid), "the chat to end")
    finish_reason, length = wait_for(lambda: answer_in_store(home), "the answer")
    assert finish_reason == "interrupted" and length > 0
    assert saved_caches(home), "no KV cache saved"
