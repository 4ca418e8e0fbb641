"""Chat settings and the app's config file: what a conversation samples with, and what new
conversations start from.

Settings (`ChatSettings`, the engine's `TurnSettings`) live per conversation in the history
store; the app-wide defaults and the last model used live in `config_dir()/config.json`,
written atomically (a temporary file, then a rename) so a crash never leaves half a file.
Values are validated before anything is saved: a bad one is refused with a message, the old
settings stay.
"""

from __future__ import annotations

from typing import Any

from apertus_mlx.errors import UsageError
from apertus_mlx.settings import TurnSettings
from apertus_mlx.user_config import MAX_CONFIG_BYTES, AppConfig  # noqa: F401 - the app's

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
