"""Find a model on this machine: a local directory, or a hub repo id in the Hugging Face cache.

Resolution never touches the network: `apertus-mlx download` is the one command that does.
"""

from __future__ import annotations

from pathlib import Path

from .errors import ModelNotFoundError

# Files a checkpoint needs to run here; never *.bin, *.pt or code.
ALLOW_PATTERNS = ["*.json", "*.safetensors", "*.jinja", "tokenizer.model"]


def looks_like_repo_id(name: str) -> bool:
    parts = name.split("/")
    return len(parts) == 2 and all(parts) and not name.startswith((".", "/", "~"))


def resolve_model(name: str | Path) -> Path:
    """The local directory holding `name`, or ModelNotFoundError with a hint."""
    path = Path(name).expanduser()
    if path.is_dir():
        return path
    name = str(name)
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
