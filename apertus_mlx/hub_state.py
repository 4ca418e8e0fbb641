"""Whether a model in the Hugging Face cache is whole: "downloaded" means every file of the
snapshot is there at the size the hub listed, not merely that its folder exists.

The hub's file list (names and sizes, filtered like the download) is written to a small
manifest when a download starts, so the check later needs no network. A model fetched by
another tool has no manifest: it counts as whole when its config, tokenizer and every weight
file its index names are present, and no file is still being written.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from .paths import data_dir


@dataclass(frozen=True)
class LocalState:
    """What of a model is on disk: bytes of finished files, of the whole snapshot (0 when
    unknown), and whether every file is whole."""

    done: int
    total: int
    complete: bool

    @property
    def percent(self) -> int:
        """Whole percents done, 99 at most until complete (a rounded 100% would look whole)."""
        if self.complete:
            return 100
        return min(99, self.done * 100 // self.total) if self.total else 0


def manifest_path(repo: str) -> Path:
    return data_dir() / "downloads" / (repo.replace("/", "--") + ".json")


def read_manifest(repo: str) -> dict[str, int] | None:
    """file name -> size in bytes, as the hub listed them at the last download; None if none."""
    try:
        files = json.loads(manifest_path(repo).read_text("utf-8"))["files"]
        return {str(name): int(size) for name, size in files.items()}
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None


def write_manifest(repo: str, files: dict[str, int]) -> None:
    path = manifest_path(repo)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({"repo": repo, "files": files}, indent=1), "utf-8")
    tmp.replace(path)


def forget(repo: str) -> None:
    manifest_path(repo).unlink(missing_ok=True)


def remote_files(repo: str, allow_patterns: list[str]) -> dict[str, int]:
    """The hub's list of the files a download fetches, with their sizes (network)."""
    from huggingface_hub import HfApi
    from huggingface_hub.hf_api import RepoFile
    from huggingface_hub.utils import filter_repo_objects

    api = HfApi()
    # repo info first: it fails at once when the hub is unreachable (the tree listing would
    # retry for half a minute), and names the commit the download will fetch
    sha = api.repo_info(repo, revision="main").sha
    entries = [e for e in api.list_repo_tree(repo, revision=sha, recursive=True)
               if isinstance(e, RepoFile)]  # fmt: skip
    kept = filter_repo_objects(entries, allow_patterns=allow_patterns, key=lambda e: e.path)
    return {e.path: int(e.size) for e in kept}


def local_state(repo: str, snapshot: Path | None, repo_folder: Path | None = None) -> LocalState:
    """How much of `repo` is in `snapshot` (its snapshot folder in the cache, None if none)."""
    files = read_manifest(repo)
    if files is not None:
        done = 0
        for name, size in files.items():
            if snapshot is not None and _size(snapshot / name) == size:
                done += size
        total = sum(files.values())
        return LocalState(done, total, done == total and snapshot is not None)
    return _without_manifest(snapshot, repo_folder)


def _size(path: Path) -> int | None:
    try:
        return path.stat().st_size
    except OSError:
        return None


def _without_manifest(snapshot: Path | None, repo_folder: Path | None) -> LocalState:
    """No file list from the hub: whole when what a checkpoint needs to load is present."""
    if snapshot is None or not snapshot.is_dir():
        return LocalState(0, 0, False)
    done = sum(s for p in snapshot.iterdir() if (s := _size(p)) is not None)
    writing = repo_folder is not None and any((repo_folder / "blobs").glob("*.incomplete"))
    needed = ["config.json", "tokenizer.json"]
    index = snapshot / "model.safetensors.index.json"
    try:
        needed += sorted(set(json.loads(index.read_text("utf-8"))["weight_map"].values()))
    except FileNotFoundError:
        if not any(snapshot.glob("*.safetensors")):
            needed.append("model.safetensors")
    except (OSError, ValueError, KeyError, AttributeError):
        needed.append(index.name + " (readable)")
    complete = not writing and all((snapshot / name).is_file() for name in needed)
    return LocalState(done, done if complete else 0, complete)
