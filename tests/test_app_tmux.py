"""End to end: the real `apertus-mlx chat` in a tmux terminal, typed into and read from the
screen as a user would (skipped where tmux is absent)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

pytestmark = pytest.mark.skipif(shutil.which("tmux") is None, reason="needs tmux")


def screen(session: str) -> str:
    out = subprocess.run(["tmux", "capture-pane", "-p", "-t", session], capture_output=True,
                         text=True)  # fmt: skip
    return out.stdout


def wait_screen(session: str, condition, timeout: float = 60.0) -> str:
    deadline = time.monotonic() + timeout
    text = screen(session)
    while not condition(text):
        assert time.monotonic() < deadline, f"timed out; the screen shows:\n{text}"
        time.sleep(0.2)
        text = screen(session)
    return text


def test_real_chat_in_a_terminal(tiny_model_dir, tmp_path):
    session = f"apertus-test-{uuid.uuid4().hex[:8]}"
    exe = Path(sys.executable).with_name("apertus-mlx")
    command = [str(exe)] if exe.exists() else [sys.executable, "-m", "apertus_mlx"]
    env = {
        "APERTUS_MLX_HOME": str(tmp_path / "home"),
        "HF_HOME": str(tmp_path / "hf"),
        "HF_HUB_OFFLINE": "1",
        "TERM": "xterm-256color",
        "PATH": os.environ.get("PATH", ""),
    }
    shell = " ".join(f"{k}='{v}'" for k, v in env.items())
    shell += " " + " ".join(command) + f" chat -m '{tiny_model_dir}' --temp 0 -n 12"
    subprocess.run(["tmux", "new-session", "-d", "-s", session, "-x", "110", "-y", "32", shell],
                   check=True)  # fmt: skip
    try:
        wait_screen(session, lambda s: "context 0/512" in s or "tok/s" in s)
        wait_screen(session, lambda s: "model:" in s and "loading" not in s)
        subprocess.run(["tmux", "send-keys", "-t", session, "Hello from tmux"], check=True)
        subprocess.run(["tmux", "send-keys", "-t", session, "Enter"], check=True)
        text = wait_screen(session, lambda s: "tokens ·" in s and "tok/s ·" in s)
        assert "Hello from tmux" in text
        assert "context " in text and "/512" in text
        subprocess.run(["tmux", "send-keys", "-t", session, "C-q"], check=True)
        deadline = time.monotonic() + 20
        while subprocess.run(["tmux", "has-session", "-t", session],
                             capture_output=True).returncode == 0:  # fmt: skip
            assert time.monotonic() < deadline, "the app did not quit"
            time.sleep(0.2)
    finally:
        subprocess.run(["tmux", "kill-session", "-t", session], capture_output=True)
