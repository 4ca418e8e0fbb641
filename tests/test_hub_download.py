"""`download`, `models`, `rm` and offline resolution, with the real huggingface_hub client
against a hub served on 127.0.0.1 (tests/hub_server.py). Each command runs as a user runs it."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.hub_server import FakeHub

REPO = "test-org/apertus-tiny"


def run(*args: str, hf_home: Path, endpoint: str, offline: bool = False):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGINGFACE_"))} | {
        "HF_HOME": str(hf_home),
        "HF_ENDPOINT": endpoint,
        "HF_HUB_DISABLE_TELEMETRY": "1",
        "HF_HUB_DISABLE_XET": "1",
        "HF_HUB_DISABLE_PROGRESS_BARS": "1",
        "PYTHONIOENCODING": "utf-8",
    }
    if offline:
        env["HF_HUB_OFFLINE"] = "1"
    return subprocess.run(
        [sys.executable, "-m", "apertus_mlx", *args],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )


def one_line_error(out: subprocess.CompletedProcess) -> str:
    assert out.returncode != 0
    assert "Traceback" not in out.stderr
    lines = [line for line in out.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, out.stderr
    return lines[0]


@pytest.fixture
def served_repo(tiny_model_dir, tmp_path) -> Path:
    """The tiny checkpoint plus files a download must leave behind: pickles and code."""
    repo = tmp_path / "served"
    shutil.copytree(tiny_model_dir, repo)
    (repo / "pytorch_model.bin").write_bytes(b"pickle: never fetched")
    (repo / "modeling_evil.py").write_text("raise SystemExit('never fetched')\n")
    return repo


def test_download_list_run_offline_and_remove(served_repo, tmp_path):
    home = tmp_path / "hf"
    with FakeHub({REPO: served_repo}) as hub:
        out = run("download", REPO, hf_home=home, endpoint=hub.url)
        assert out.returncode == 0, out.stderr
        snapshot = Path(out.stdout.strip().removeprefix("ready: "))
        fetched = {p.name for p in snapshot.iterdir()}
        assert {"config.json", "model.safetensors", "tokenizer.json"} <= fetched
        assert not fetched & {"pytorch_model.bin", "modeling_evil.py"}
        for name in fetched:
            assert (snapshot / name).read_bytes() == (served_repo / name).read_bytes()
        assert not any("pytorch_model.bin" in r or "evil" in r for r in hub.requests)

    # the hub is gone: everything else works offline
    endpoint = hub.url
    listed = run("models", hf_home=home, endpoint=endpoint)
    assert listed.returncode == 0 and REPO in listed.stdout
    answer = run(
        "generate", "Grüezi", "-m", REPO, "-n", "3", "--temp", "0", "--json",
        hf_home=home, endpoint=endpoint, offline=True,
    )  # fmt: skip
    assert answer.returncode == 0, answer.stderr
    assert '"generated_tokens": 3' in answer.stdout

    removed = run("rm", REPO, "--yes", hf_home=home, endpoint=endpoint)
    assert removed.returncode == 0 and "deleted" in removed.stdout
    assert not snapshot.exists()
    gone = run("generate", "Grüezi", "-m", REPO, hf_home=home, endpoint=endpoint, offline=True)
    assert "apertus-mlx download" in one_line_error(gone)


def test_unknown_repo_and_unreachable_hub_are_one_line(served_repo, tmp_path):
    home = tmp_path / "hf"
    with FakeHub({REPO: served_repo}) as hub:
        unknown = run("download", "test-org/nope", hf_home=home, endpoint=hub.url)
        assert "test-org/nope" in one_line_error(unknown)
    unreachable = run("download", REPO, hf_home=home, endpoint=hub.url)  # server stopped
    assert REPO in one_line_error(unreachable)
    assert not (home / "hub").exists() or not any((home / "hub").rglob("*.safetensors"))


def test_dropped_connection_is_retried_and_the_file_is_whole(served_repo, tmp_path):
    home = tmp_path / "hf"
    with FakeHub({REPO: served_repo}) as hub:
        hub.cut["model.safetensors"] = 1000
        out = run("download", REPO, hf_home=home, endpoint=hub.url)
        assert out.returncode == 0, out.stderr
        gets = [r for r in hub.requests if r.startswith("GET") and "model.safetensors" in r]
        assert len(gets) == 2  # the dropped one and the retry
    snapshot = Path(out.stdout.strip().removeprefix("ready: "))
    want = (served_repo / "model.safetensors").read_bytes()
    assert (snapshot / "model.safetensors").read_bytes() == want
