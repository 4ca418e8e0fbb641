"""`download`, `models`, `rm` and offline resolution, with the real huggingface_hub client
against a hub served on 127.0.0.1 (tests/hub_server.py). Each command runs as a user runs it."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from tests.hub_server import FakeHub, point_client_at

REPO = "test-org/apertus-tiny"


def run(*args: str, hf_home: Path, endpoint: str, offline: bool = False):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGINGFACE_"))} | {
        "HF_HOME": str(hf_home),
        "APERTUS_MLX_HOME": str(hf_home.parent / "home"),  # the download manifests
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


def test_dropped_connection_is_resumed_and_the_file_is_whole(served_repo, tmp_path):
    """The connection drops after 10.5 MB of a 12 MB file: the retry asks for the rest (a
    Range after the first byte, the client keeping what it wrote in whole 10 MiB chunks),
    and the file ends up whole."""
    home, big = tmp_path / "hf", "big.safetensors"
    data = np.random.default_rng(0).bytes(12_000_000)
    (served_repo / big).write_bytes(data)
    with FakeHub({REPO: served_repo}) as hub:
        hub.cut[big] = 10_500_000
        out = run("download", REPO, hf_home=home, endpoint=hub.url)
        assert out.returncode == 0, out.stderr
    (first, zero), (again, start) = [d for d in hub.downloads if d[0] == big]
    assert zero == 0 and 0 < start <= 10_500_000
    snapshot = Path(out.stdout.strip().removeprefix("ready: "))
    assert (snapshot / big).read_bytes() == data
    assert (snapshot / "model.safetensors").read_bytes() == (
        served_repo / "model.safetensors"
    ).read_bytes()


@pytest.fixture
def in_process_hub(served_repo, tmp_path, monkeypatch):
    """A FakeHub serving REPO, and huggingface_hub in this process pointed at it, with an
    empty cache in tmp: for downloads driven from Python (`hub.download`)."""
    from huggingface_hub import constants

    with FakeHub({REPO: served_repo}) as served:
        monkeypatch.setenv("APERTUS_MLX_HOME", str(tmp_path / "home"))
        monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf"))
        point_client_at(monkeypatch, served.url)
        yield served


def test_a_cancelled_download_resumes_and_a_finished_one_is_never_fetched_again(
    in_process_hub, served_repo, tmp_path
):
    """Cancelled while the weights arrive: the files that arrived are not fetched again, the
    rest is asked for from where its kept part ends, and once the model is whole no file is
    downloaded again."""
    from apertus_mlx import hub

    served, big = in_process_hub, "model.safetensors"
    wanted = {p.name for p in served_repo.iterdir() if any(p.match(g) for g in hub.ALLOW_PATTERNS)}
    cache = tmp_path / "hf" / f"models--{REPO.replace('/', '--')}"
    cancel = threading.Event()

    def others_arrived() -> set[str]:
        return {p.name for p in cache.glob("snapshots/*/*")}

    def cancel_once_the_rest_arrived() -> None:  # runs before the weights are sent
        deadline = time.monotonic() + 30
        while others_arrived() != wanted - {big} and time.monotonic() < deadline:
            time.sleep(0.01)  # polling the cache, not waiting for a guessed time
        cancel.set()

    served.before[big] = cancel_once_the_rest_arrived
    with pytest.raises(hub.DownloadCancelled):
        hub.download(REPO, progress=lambda done, total: None, cancel=cancel)
    arrived = others_arrived()
    assert arrived == wanted - {big}
    # what is left of the weights in the cache (huggingface_hub >= 1.18 keeps nothing of a
    # file it did not finish; earlier versions keep `<etag>.incomplete` to resume from)
    kept = sum(p.stat().st_size for p in (cache / "blobs").glob("*.incomplete"))

    served.downloads.clear()
    path = hub.download(REPO)
    assert [name for name, _ in served.downloads] == [big]  # nothing that arrived
    assert served.downloads == [(big, kept)]
    for name in arrived | {big}:
        assert (path / name).read_bytes() == (served_repo / name).read_bytes()

    served.downloads.clear()
    assert hub.download(REPO) == path
    assert served.downloads == []


def test_a_cancelled_download_is_partial_everywhere_until_resumed(in_process_hub, served_repo):
    """Cancelled before the weights arrive: the config and tokenizer are in the cache, but
    the model is "partial (N%)" (N from the hub's sizes), not downloaded: it does not
    resolve, `models` says so; the next download finishes it and then it is whole."""
    from click.testing import CliRunner

    from apertus_mlx import hub
    from apertus_mlx.commands.models import list_models

    served, big = in_process_hub, "model.safetensors"
    cancel = threading.Event()
    served.before[big] = cancel.set  # stop once the other files are written
    with pytest.raises(hub.DownloadCancelled):
        hub.download(REPO, progress=lambda done, total: None, cancel=cancel)

    wanted = {p.name: p.stat().st_size for p in served_repo.iterdir()
              if any(p.match(g) for g in hub.ALLOW_PATTERNS)}  # fmt: skip
    here = hub.local_models()[REPO]
    assert not here.complete
    assert here.state.total == sum(wanted.values())
    arrived = {p.name for p in here.path.iterdir()}  # the files that arrived before the stop
    assert big not in arrived
    assert here.state.done == sum(wanted[name] for name in arrived)
    expected_percent = here.state.done * 100 // here.state.total
    assert REPO not in hub.cached_models() and not hub.is_ready(REPO)
    with pytest.raises(hub.ModelNotFoundError, match="partly downloaded"):
        hub.resolve_model(REPO)
    listed = CliRunner().invoke(list_models, ["--json"]).output
    row = next(json.loads(line) for line in listed.splitlines() if REPO in line)
    assert row["downloaded"] is False and row["partial_percent"] == expected_percent

    path = hub.download(REPO)
    assert hub.local_models()[REPO].complete and hub.resolve_model(REPO) == path
    listed = CliRunner().invoke(list_models, ["--json"]).output
    row = next(json.loads(line) for line in listed.splitlines() if REPO in line)
    assert row["downloaded"] is True and row["partial_percent"] is None


def test_cli_download_draws_one_bar_of_its_own_and_ready_on_its_own_line(served_repo, tmp_path):
    with FakeHub({REPO: served_repo}) as served:
        out = run("download", REPO, hf_home=tmp_path / "hf", endpoint=served.url)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("ready: ") and out.stdout.count("\n") == 1
    assert "Fetching" not in out.stderr  # the hub client's own bars are not drawn
    assert REPO in out.stderr  # ours is
