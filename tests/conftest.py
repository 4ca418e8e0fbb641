"""Session fixtures: one tokenizer and a handful of tiny checkpoints, built once, no network."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
# Nothing a test writes (history, settings, saved caches, an installed filter) reaches the
# developer's own data directory, and nothing installed there changes a test's outcome.
os.environ["APERTUS_MLX_HOME"] = tempfile.mkdtemp(prefix="apertus-mlx-home-")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from tests.checkpoints import (  # noqa: E402
    SCRIPTS,
    VARIANTS,
    build_checkpoint,
    build_endless_checkpoint,
    build_scripted_checkpoint,
)


@pytest.fixture(scope="session")
def _tokenizer_build(tmp_path_factory) -> tuple[Path, int]:
    from fixtures.tokenizer import build_tokenizer

    out = tmp_path_factory.mktemp("tokenizer")
    return out, build_tokenizer(out)


@pytest.fixture(scope="session")
def tokenizer_dir(_tokenizer_build) -> Path:
    return _tokenizer_build[0]


@pytest.fixture(scope="session")
def vocab_size(_tokenizer_build) -> int:
    return _tokenizer_build[1]


@pytest.fixture(scope="session")
def checkpoint(tmp_path_factory, tokenizer_dir, vocab_size):
    """checkpoint(name) -> directory of the VARIANTS entry `name`, built on first use."""
    built: dict[str, Path] = {}

    def get(name: str) -> Path:
        if name not in built:
            overrides, dtype, save = VARIANTS[name]
            out = tmp_path_factory.mktemp(name)
            built[name] = build_checkpoint(out, tokenizer_dir, vocab_size, overrides, dtype, **save)
        return built[name]

    return get


@pytest.fixture(scope="session")
def tiny_model_dir(checkpoint) -> Path:
    return checkpoint("gqa-llama3-f32")


@pytest.fixture(scope="session")
def endless_model(tmp_path_factory, tokenizer_dir, vocab_size) -> Path:
    """A checkpoint whose greedy answers never end (see `build_endless_checkpoint`)."""
    return build_endless_checkpoint(tmp_path_factory.mktemp("endless"), tokenizer_dir, vocab_size)


@pytest.fixture(scope="session")
def scripted(tmp_path_factory, tokenizer_dir):
    """scripted(name) -> a checkpoint that says the SCRIPTS entry `name` at any temperature
    (see `build_scripted_checkpoint`), built on first use."""
    built: dict[str, Path] = {}

    def get(name: str) -> Path:
        if name not in built:
            out = tmp_path_factory.mktemp(f"scripted-{name}")
            built[name] = build_scripted_checkpoint(out, tokenizer_dir, SCRIPTS[name])
        return built[name]

    return get
