"""Find a model on this machine: a local directory, or a hub repo id in the Hugging Face cache.

Resolution never touches the network: `apertus-mlx download` is the one command that does.
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import cache
from importlib import resources
from pathlib import Path

from .errors import ApertusError, CacheError, ModelNotFoundError, NetworkError
from .hub_state import LocalState, forget, local_state, remote_files, write_manifest


class DownloadCancelled(Exception):
    """The user stopped a download; the files that arrived whole stay in the cache, and the
    next download fetches only the rest (a file cut short starts over: huggingface_hub 1.18
    and later keep no partial files)."""


# The hub client reads this many bytes between progress reports (and cancel checks); its
# default, 10 MiB, makes a small model's bar jump and a cancel wait seconds.
CHUNK_BYTES = 512 * 1024


# Files a checkpoint needs to run here; never *.bin, *.pt or code.
ALLOW_PATTERNS = ["*.json", "*.safetensors", "*.jinja", "tokenizer.model"]


@dataclass(frozen=True)
class CatalogEntry:
    alias: str
    repo: str
    params: str
    format: str
    size_gb: float
    context: int
    description: str
    # True when the repo id follows the publisher's naming but was not found on the hub yet
    unconfirmed: bool = False
    recommended: bool = False  # the chat app's suggestion for a first model


@cache
def catalog() -> tuple[CatalogEntry, ...]:
    """The known Apertus checkpoints shipped in the wheel (models/catalog.toml)."""
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        import tomli as tomllib

    text = resources.files("apertus_mlx.catalog").joinpath("catalog.toml").read_text("utf-8")
    return tuple(CatalogEntry(**m) for m in tomllib.loads(text)["model"])


def repo_for(name: str) -> str:
    """A catalog alias becomes its repo id; anything else is returned as it is."""
    for entry in catalog():
        if name.lower() == entry.alias:
            return entry.repo
    return name


def catalog_entry(name: str) -> CatalogEntry | None:
    """The catalog entry for an alias or a repo id, if the catalog knows it."""
    key = name.lower()
    return next((e for e in catalog() if key in (e.alias, e.repo.lower())), None)


def recommended() -> CatalogEntry:
    """The model the chat app offers first (the catalog marks one; else its first entry)."""
    return next((e for e in catalog() if e.recommended), catalog()[0])


def looks_like_repo_id(name: str) -> bool:
    parts = name.split("/")
    return len(parts) == 2 and all(parts) and not name.startswith((".", "/", "~"))


def resolve_model(name: str | Path) -> Path:
    """The local directory holding `name`, or ModelNotFoundError with a hint."""
    path = Path(name).expanduser()
    if path.is_dir():
        return path
    if path.exists():
        raise ModelNotFoundError(f"{name} is a file: give the checkpoint's directory")
    repo = repo_for(str(name))
    if not looks_like_repo_id(repo):
        raise ModelNotFoundError(f"no model directory at {str(name)!r}")
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        snapshot = Path(
            snapshot_download(repo, allow_patterns=ALLOW_PATTERNS, local_files_only=True)
        )
    except (LocalEntryNotFoundError, OSError, ValueError):
        partial = _partly_downloaded(repo)
        if partial is not None:
            raise ModelNotFoundError(partial) from None
        if repo == str(name):  # shaped like a repo id, maybe meant as a relative directory
            raise ModelNotFoundError(
                f"no directory {name} here, and {repo} is not in the Hugging Face cache: "
                f"give a checkpoint directory, or run `apertus-mlx download {repo}`"
            ) from None
        raise ModelNotFoundError(
            f"{repo} is not downloaded yet: run `apertus-mlx download {repo}`"
        ) from None
    if not local_state(repo, snapshot, snapshot.parent.parent).complete:
        raise ModelNotFoundError(_partly_downloaded(repo) or f"{repo} is incomplete")
    return snapshot


def _partly_downloaded(repo: str) -> str | None:
    """The error for a model the cache holds only part of; None if it holds none of it."""
    try:
        here = local_models().get(repo)
    except CacheError:
        return None
    if here is None or here.complete:
        return None
    return (
        f"{repo} is only partly downloaded ({here.state.percent}%): "
        f"run `apertus-mlx download {repo}` to finish it"
    )


def model_identity(name: str | Path) -> tuple[str, str | None]:
    """(model, revision) to record with an answer: a directory as its absolute path (no
    revision; symlinks kept, the user may re-point them); a hub model as its repo id and the
    snapshot hash it runs from."""
    path = Path(name).expanduser()
    if path.is_dir():
        return os.path.abspath(path), None
    snapshot = resolve_model(name)
    return repo_for(str(name)), snapshot.name if snapshot.parent.name == "snapshots" else None


def progress_class(report: Callable[[int, int], None], cancel: threading.Event | None = None):
    """A tqdm class for `snapshot_download(tqdm_class=...)` that calls report(done, total) in
    bytes instead of drawing, and stops the download (DownloadCancelled) once `cancel` is set.

    huggingface_hub sums every file's bytes into one bar (files already on disk count as its
    initial value), so report sees the whole snapshot; it is called from download threads.
    """
    import io

    from tqdm import tqdm

    class Progress(tqdm):
        def __init__(self, *args, **kwargs):
            kwargs.pop("name", None)
            kwargs.update(file=io.StringIO(), disable=False)
            self._bytes = kwargs.get("unit") == "B" and "Downloading" not in kwargs.get("desc", "")
            super().__init__(*args, **kwargs)

        def update(self, n=1):
            if cancel is not None and cancel.is_set():
                raise DownloadCancelled("download cancelled")
            shown = super().update(n)
            if self._bytes:
                report(int(self.n), int(self.total or 0))
            return shown

    return Progress


def download(
    name: str,
    *,
    progress: Callable[[int, int], None] | None = None,
    cancel: threading.Event | None = None,
) -> Path:
    """Download (or finish downloading) a model into the Hugging Face cache, with progress bars.

    Files already in the cache are not fetched again; only safetensors, JSON and templates
    come. A dropped connection is retried from where it broke off, within this call.
    progress: called with (bytes done, bytes total) instead of drawing bars; cancel: set it to
    stop the download with DownloadCancelled (finished files stay for the next download).
    """
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
    )

    repo = repo_for(name)
    if not looks_like_repo_id(repo):
        raise ModelNotFoundError(f"{name!r} is neither a catalog alias nor a repo id (owner/name)")
    _check_cache_dir()
    try:
        kwargs = {}
        if progress is not None or cancel is not None:
            kwargs["tqdm_class"] = progress_class(progress or (lambda done, total: None), cancel)
        _remember_file_list(repo)
        constants.DOWNLOAD_CHUNK_SIZE = min(constants.DOWNLOAD_CHUNK_SIZE, CHUNK_BYTES)
        with _hub_warnings_quiet():
            path = Path(snapshot_download(repo, allow_patterns=ALLOW_PATTERNS, **kwargs))
        state = local_state(repo, path, path.parent.parent)
        if not state.complete:  # the hub changed the files under us, or the disk lost some
            raise CacheError(
                f"download of {repo} ended with {state.percent}% of its files whole: run it again"
            )
        return path
    except GatedRepoError:
        raise ModelNotFoundError(
            f"{repo} is gated: accept its terms on huggingface.co, then `hf auth login`"
        ) from None
    except RepositoryNotFoundError:
        entry = catalog_entry(repo)
        if entry is not None and entry.unconfirmed:
            raise ModelNotFoundError(
                f"{repo}: not found on the hub yet (the catalog lists it by the publisher's naming)"
            ) from None
        raise ModelNotFoundError(
            f"no repository {repo} on the hub (see `apertus-mlx models`)"
        ) from None
    except LocalEntryNotFoundError:
        from huggingface_hub.constants import HF_HUB_OFFLINE

        why = "HF_HUB_OFFLINE is set" if HF_HUB_OFFLINE else "are you offline?"
        raise NetworkError(f"cannot reach the hub to download {repo}: {why}") from None
    except HfHubHTTPError as e:
        raise NetworkError(f"download of {repo} failed: {' '.join(str(e).split())}") from None
    except OSError as e:  # disk full, permissions: finished files stay for the next download
        raise CacheError(f"download of {repo} stopped: {e.strerror or e}") from None
    except ValueError as e:  # e.g. a name huggingface_hub does not accept as a repo id
        raise ModelNotFoundError(f"{repo!r} is not a valid repo id ({e})") from None


def _remember_file_list(repo: str) -> None:
    """Write the hub's file list (names, sizes) for the completeness check; a repo the hub
    does not know, or a gated one, is raised as it is; other failures leave the download to
    report them in its own words."""
    from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError

    try:
        files = remote_files(repo, ALLOW_PATTERNS)
    except (GatedRepoError, RepositoryNotFoundError):
        raise
    except Exception:  # noqa: BLE001 - offline, hub down: snapshot_download says which
        return
    if files:  # an unwritable home: the check falls back to what a load needs
        with contextlib.suppress(OSError):
            write_manifest(repo, files)


def _cached_repos() -> frozenset:
    """huggingface_hub's view of the cache; an unusable cache is one CacheError."""
    from huggingface_hub import constants, scan_cache_dir
    from huggingface_hub.errors import CacheNotFound

    try:
        return scan_cache_dir(constants.HF_HUB_CACHE).repos
    except CacheNotFound:
        return frozenset()
    except (ValueError, OSError) as e:
        cache = Path(constants.HF_HUB_CACHE)
        if cache.exists() and not cache.is_dir():
            raise CacheError(f"the Hugging Face cache {cache} is a file, not a directory") from None
        raise CacheError(f"cannot read the Hugging Face cache at {cache}: {e}") from None


def _check_cache_dir() -> None:
    """Before any request: the cache must be a directory we can write (its nearest existing
    folder, when it is still to be created). Otherwise huggingface_hub starts anyway, prints
    its own "Ignored error" lines and progress bars, and fails at the first file."""
    from huggingface_hub import constants

    cache = Path(constants.HF_HUB_CACHE)
    if cache.exists() and not cache.is_dir():
        raise CacheError(
            f"the Hugging Face cache {cache} is a file, not a directory (HF_HUB_CACHE)"
        )
    existing = next((p for p in (cache, *cache.parents) if p.exists()), None)
    if existing is not None and not os.access(existing, os.W_OK | os.X_OK):
        raise CacheError(
            f"cannot download into the Hugging Face cache {cache}: {existing} is read-only "
            "(set HF_HOME or HF_HUB_CACHE to a writable folder)"
        )


@contextlib.contextmanager
def _hub_warnings_quiet() -> Iterator[None]:
    """huggingface_hub logs what it works around ("Ignored error while writing ...") on
    stderr; we report what matters in one line of our own, and in the chat its lines would
    land on the screen. Its errors still show."""
    from huggingface_hub.utils import logging as hub_logging

    level = hub_logging.get_verbosity()
    hub_logging.set_verbosity(max(level, hub_logging.ERROR))
    try:
        yield
    finally:
        hub_logging.set_verbosity(level)


@dataclass(frozen=True)
class LocalModel:
    """A model in the cache: its newest snapshot, bytes on disk, and how whole it is."""

    repo: str
    path: Path
    size_on_disk: int
    state: LocalState

    @property
    def complete(self) -> bool:
        return self.state.complete


def local_models() -> dict[str, LocalModel]:
    """repo id -> LocalModel for every model in the cache, whole or partly downloaded."""
    out = {}
    for repo in _cached_repos():
        if repo.repo_type != "model":
            continue
        path = None
        if repo.revisions:
            path = Path(max(repo.revisions, key=lambda r: r.last_modified).snapshot_path)
        state = local_state(repo.repo_id, path, Path(repo.repo_path))
        out[repo.repo_id] = LocalModel(
            repo.repo_id, path or Path(repo.repo_path), repo.size_on_disk, state
        )
    return out


def is_ready(name: str) -> bool:
    """Whether `name` (a directory, alias or repo id) can be loaded without a download."""
    try:
        resolve_model(name)
    except ApertusError:
        return False
    return True


def cached_models() -> dict[str, tuple[Path, int]]:
    """repo id -> (snapshot directory, bytes on disk) for every *whole* model in the cache."""
    return {r: (m.path, m.size_on_disk) for r, m in local_models().items() if m.complete}


def cached_repo(name: str) -> tuple[str, Path, int]:
    """(repo id, its folder in the cache, bytes on disk) of a downloaded model, or
    ModelNotFoundError."""
    repo = repo_for(name)
    for cached in _cached_repos():
        if cached.repo_type == "model" and cached.repo_id == repo:
            return repo, Path(cached.repo_path), cached.size_on_disk
    raise ModelNotFoundError(
        f"{repo} is not downloaded: nothing to delete (see `apertus-mlx models`)"
    )


def remove(name: str) -> int:
    """Delete a model from the cache; return the bytes freed.

    The repo's own folder goes, whole: deleting by revision hash would pick any repo whose
    revision has the same hash (two repos holding the same commit). A read-only cache is
    refused before anything is touched, and the result is checked: a model still present
    after `rm` is an error, never "deleted".
    """
    import shutil

    repo, path, size = cached_repo(name)
    for folder in (path.parent, path, *(p for p in path.rglob("*") if p.is_dir())):
        if not os.access(folder, os.W_OK | os.X_OK):
            raise CacheError(f"cannot delete {repo}: {folder} is read-only (nothing deleted)")
    failures: list[str] = []
    shutil.rmtree(path, onerror=lambda _f, p, exc: failures.append(f"{p}: {exc[1]}"))
    if path.exists():
        first = failures[0] if failures else "unknown reason"
        raise CacheError(f"{repo} is only partly deleted ({first}); {path} remains")
    lock = path.parent / ".locks" / path.name  # huggingface_hub's download locks
    shutil.rmtree(lock, ignore_errors=True)
    forget(repo)
    return size
