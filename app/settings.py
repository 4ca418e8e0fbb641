"""Chat settings and the app's config file: what a conversation samples with, and what new
conversations start from.

Settings (`ChatSettings`, the engine's `TurnSettings`) live per conversation in the history
store; the app-wide defaults and the last model used live in `config_dir()/config.json`,
written atomically (a temporary file, then a rename) so a crash never leaves half a file.
Values are validated before anything is saved: a bad one is refused with a message, the old
settings stay.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from apertus_mlx.errors import UsageError
from apertus_mlx.settings import TurnSettings

CONFIG_NAME = "config.json"
MAX_CONFIG_BYTES = 1 << 20  # ours is a few hundred bytes; a larger file is not one we wrote

# One settings type for the chat, the CLI and the server: what a conversation stores.
ChatSettings = TurnSettings


# Form fields: name -> (label, parser). Empty text means "default" (None).
FIELDS: dict[str, tuple[str, type]] = {
    "temperature": ("Temperature (0 = greedy)", float),
    "top_p": ("Top-p (0, 1]", float),
    "top_k": ("Top-k (0 = off)", int),
    "min_p": ("Min-p [0, 1)", float),
    "repetition_penalty": ("Repetition penalty (1 = off)", float),
    "max_tokens": ("Max tokens per answer", int),
    "seed": ("Seed (empty = random)", int),
}


# What an empty field means, shown in it.
PLACEHOLDERS: dict[str, str] = {
    "temperature": "model's default (0.8 if none)",
    "top_p": "model's default (0.9 if none)",
    "top_k": "off",
    "min_p": "off",
    "repetition_penalty": "off",
    "max_tokens": "4096, at most a quarter of the window",
    "seed": "random",
}


def parse_form(
    values: dict[str, str], system: str, thinking: bool, base: ChatSettings | None = None
) -> ChatSettings:
    """Settings from the settings form's text, over `base` (what the form does not show, such
    as stop strings, stays); UsageError names the field that is wrong."""
    parsed: dict[str, Any] = {}
    for name, text in values.items():
        label, kind = FIELDS[name]
        text = text.strip()
        if not text:
            parsed[name] = None
            continue
        try:
            parsed[name] = kind(text)
        except ValueError:
            noun = "a whole number" if kind is int else "a number"
            raise UsageError(f"{label.split(' (')[0]}: {text!r} is not {noun}") from None
    return (base or ChatSettings()).with_(
        **parsed, system=system.strip() or None, thinking=thinking
    )


def form_text(value: Any) -> str:
    return "" if value is None else f"{value:g}" if isinstance(value, float) else str(value)


@dataclass
class AppConfig:
    """The config file: the model the app opens on, and the defaults of new conversations."""

    last_model: str | None = None
    defaults: ChatSettings = ChatSettings()

    @classmethod
    def path(cls) -> Path:
        from apertus_mlx.paths import config_dir

        return config_dir() / CONFIG_NAME

    @classmethod
    def load(cls) -> AppConfig:
        """The saved config; a missing file is the default config. A damaged one raises
        UsageError (the app reports it and starts on defaults, leaving the file alone)."""
        path = cls.path()
        try:
            with path.open("rb") as f:
                raw = f.read(MAX_CONFIG_BYTES + 1)
        except FileNotFoundError:
            return cls()
        except OSError as e:
            raise UsageError(f"cannot read {path}: {e.strerror or e}") from None
        if len(raw) > MAX_CONFIG_BYTES:
            raise UsageError(f"cannot read {path}: larger than {MAX_CONFIG_BYTES:,} bytes")
        try:
            data = json.loads(raw)
        except ValueError as e:  # not UTF-8, not JSON
            raise UsageError(f"cannot read {path}: {e}") from None
        except RecursionError:  # nested deeper than the parser's stack: not ours
            raise UsageError(f"cannot read {path}: the JSON is nested too deeply") from None
        if not isinstance(data, dict):
            raise UsageError(f"{path}: expected a JSON object")
        if not isinstance(data.get("last_model"), (str, type(None))):
            raise UsageError(f"{path}: last_model must be a model name")
        try:
            return cls(data.get("last_model"), ChatSettings.from_dict(data.get("defaults")))
        except (UsageError, TypeError, AttributeError, ValueError) as e:
            raise UsageError(f"{path}: {e}") from None

    def save(self) -> None:
        """Write atomically; OSError (disk full, read-only) is for the caller to show."""
        path = self.path()
        path.parent.mkdir(parents=True, exist_ok=True)
        data = {"last_model": self.last_model, "defaults": self.defaults.as_dict()}
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".config-", suffix=".json")
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                json.dump(data, f, indent=2)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
