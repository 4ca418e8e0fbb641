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
        name = Path(tiny_model_dir).name
        wait_screen(session, lambda s: name in s and "loading" not in s)
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


def send(session: str, *keys: str) -> None:
    subprocess.run(["tmux", "send-keys", "-t", session, *keys], check=True)


def test_cancel_resume_then_chat_in_a_terminal(tiny_model_dir, tmp_path):
    """A new user's first start against a local hub: Enter downloads the recommended model,
    `c` cancels it part-way (the row says partial, the cursor stays), Enter resumes, and the
    chat answers."""
    import threading

    from apertus_mlx.hub import recommended
    from tests.hub_server import FakeHub

    repo = recommended().repo
    gates = [threading.Event(), threading.Event()]
    calls = iter(gates)
    session = f"apertus-test-{uuid.uuid4().hex[:8]}"
    exe = Path(sys.executable).with_name("apertus-mlx")
    command = [str(exe)] if exe.exists() else [sys.executable, "-m", "apertus_mlx"]
    with FakeHub({repo: tiny_model_dir}) as hub:
        hub.before["model.safetensors"] = lambda: next(calls).wait(60)
        env = {
            "APERTUS_MLX_HOME": str(tmp_path / "home"),
            "HF_HOME": str(tmp_path / "hf"),
            "HF_ENDPOINT": hub.url,
            "HF_HUB_OFFLINE": "0",  # the tests' environment (and tmux's) may say offline
            "HF_HUB_DISABLE_XET": "1",
            "HF_HUB_DISABLE_TELEMETRY": "1",
            "TERM": "xterm-256color",
            "PATH": os.environ.get("PATH", ""),
        }
        shell = " ".join(f"{k}='{v}'" for k, v in env.items())
        shell += " " + " ".join(command) + " chat --temp 0 -n 12"
        subprocess.run(["tmux", "new-session", "-d", "-s", session, "-x", "110", "-y", "32",
                        shell], check=True)  # fmt: skip
        try:
            wait_screen(session, lambda s: "Welcome" in s)
            send(session, "Enter")
            deadline = time.monotonic() + 60
            while not any(name == "model.safetensors" for name, _ in hub.downloads):
                assert time.monotonic() < deadline, screen(session)
                time.sleep(0.1)
            send(session, "c")
            wait_screen(session, lambda s: "Cancelling" in s)
            gates[0].set()  # the weights' first bytes: the cancel takes effect
            text = wait_screen(session, lambda s: "◐" in s and "cancelled" in s)
            assert "✓" not in text
            # the files finished before the cancel (the others ran alongside the weights and
            # may have been cut with them)
            finished = {p.name for p in (tmp_path / "hf").rglob("snapshots/*/*")}
            gates[1].set()
            send(session, "Enter")  # the cursor stayed on the row: this resumes it
            wait_screen(session, lambda s: "Apertus-v1.1-4B-Instruct" in s and "context 0/" in s)
            send(session, "Hello after resuming")
            send(session, "Enter")
            text = wait_screen(session, lambda s: "tokens ·" in s and "tok/s ·" in s)
            assert "Hello after" in text  # in the list (its title) and above the answer
            send(session, "C-q")
        finally:
            subprocess.run(["tmux", "kill-session", "-t", session], capture_output=True)
    names = [name for name, _ in hub.downloads]
    assert names.count("model.safetensors") == 2  # cut by the cancel, then fetched whole
    assert finished and all(names.count(name) == 1 for name in finished)  # never again
