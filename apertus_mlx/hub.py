"""Find a model on this machine: a local directory, or a hub repo id in the Hugging Face cache.

Resolution never touches the network: `apertus-mlx download` is the one command that does.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache
from importlib import resources
from pathlib import Path

from .errors import ModelNotFoundError

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


def looks_like_repo_id(name: str) -> bool:
    parts = name.split("/")
    return len(parts) == 2 and all(parts) and not name.startswith((".", "/", "~"))


def resolve_model(name: str | Path) -> Path:
    """The local directory holding `name`, or ModelNotFoundError with a hint."""
    path = Path(name).expanduser()
    if path.is_dir():
        return path
    name = repo_for(str(name))
    if not looks_like_repo_id(name):
        raise ModelNotFoundError(f"no model directory at {name!r}")
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        return Path(snapshot_download(name, allow_patterns=ALLOW_PATTERNS, local_files_only=True))
    except (LocalEntryNotFoundError, OSError, ValueError):
        raise ModelNotFoundError(
            f"{name} is not downloaded yet: run `apertus-mlx download {name}`"
        ) from None


def download(name: str) -> Path:
    """Download (or finish downloading) a model into the Hugging Face cache, with progress bars.

    huggingface_hub resumes partial files itself; only safetensors, JSON and templates come.
    """
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
    )

    repo = repo_for(name)
    if not looks_like_repo_id(repo):
        raise ModelNotFoundError(f"{name!r} is neither a catalog alias nor a repo id (owner/name)")
    try:
        return Path(snapshot_download(repo, allow_patterns=ALLOW_PATTERNS))
    except GatedRepoError:
        raise ModelNotFoundError(
            f"{repo} is gated: accept its terms on huggingface.co, then `hf auth login`"
        ) from None
    except RepositoryNotFoundError:
        raise ModelNotFoundError(
            f"no repository {repo} on the hub (see `apertus-mlx models`)"
        ) from None
    except LocalEntryNotFoundError:
        raise ModelNotFoundError(
            f"cannot reach the hub to download {repo}: are you offline?"
        ) from None
    except HfHubHTTPError as e:
        raise ModelNotFoundError(f"download of {repo} failed: {e}") from None
    except OSError as e:  # disk full, permissions: partial files stay and resume next time
        raise ModelNotFoundError(f"download of {repo} stopped: {e.strerror or e}") from None


def cached_models() -> dict[str, tuple[Path, int]]:
    """repo id -> (snapshot directory, bytes on disk) for every model in the local cache."""
    from huggingface_hub import scan_cache_dir
    from huggingface_hub.errors import CacheNotFound

    try:
        info = scan_cache_dir()
    except CacheNotFound:
        return {}
    out = {}
    for repo in info.repos:
        if repo.repo_type == "model" and repo.revisions:
            newest = max(repo.revisions, key=lambda r: r.last_modified)
            out[repo.repo_id] = (Path(newest.snapshot_path), repo.size_on_disk)
    return out


def remove(name: str) -> int:
    """Delete a model from the cache; return the bytes freed."""
    from huggingface_hub import scan_cache_dir

    repo = repo_for(name)
    if repo not in cached_models():
        raise ModelNotFoundError(f"{repo} is not in the local cache")
    info = scan_cache_dir()
    revisions = [r.commit_hash for c in info.repos if c.repo_id == repo for r in c.revisions]
    strategy = info.delete_revisions(*revisions)
    strategy.execute()
    return strategy.expected_freed_size
