"""The app's config file (`config_dir()/config.json`): the model the chat opens on, the
defaults of new conversations, and presets. The chat writes it; `generate` reads it (its
last model when -m is not given, `--preset NAME`), so it lives in the engine, not the UI.

Written atomically (a temporary file, then a rename) so a crash never leaves half a file.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from .errors import UsageError
from .settings import TurnSettings

CONFIG_NAME = "config.json"
MAX_CONFIG_BYTES = 1 << 20  # ours is a few hundred bytes; a larger file is not one we wrote


@dataclass
class AppConfig:
    """The config file: the model the app opens on, the defaults of new conversations, and
    presets (named settings: system prompt, sampling, deliberation), with the preset each
    model starts new chats from."""

    last_model: str | None = None
    defaults: TurnSettings = TurnSettings()
    presets: dict[str, TurnSettings] = field(default_factory=dict)
    model_presets: dict[str, str] = field(default_factory=dict)  # model -> preset name

    def preset(self, name: str) -> TurnSettings:
        """The preset called `name`; UsageError naming the ones there are."""
        if name in self.presets:
            return self.presets[name]
        known = ", ".join(sorted(self.presets)) or "none yet: create them in the chat's Settings"
        raise UsageError(f"no preset {name!r} (presets: {known})")

    def for_model(self, model: str | None) -> TurnSettings:
        """What a new chat on `model` starts from: its default preset, else the defaults."""
        name = self.model_presets.get(model or "")
        return self.presets.get(name, self.defaults) if name else self.defaults

    @classmethod
    def path(cls) -> Path:
        from .paths import config_dir

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
            presets = {str(k): TurnSettings.from_dict(v)
                       for k, v in (data.get("presets") or {}).items()}  # fmt: skip
            model_presets = {str(k): str(v) for k, v in (data.get("model_presets") or {}).items()}
            return cls(data.get("last_model"), TurnSettings.from_dict(data.get("defaults")),
                       presets, model_presets)  # fmt: skip
        except (UsageError, TypeError, AttributeError, ValueError) as e:
            raise UsageError(f"{path}: {e}") from None

    def save(self) -> None:
        """Write atomically; OSError (disk full, read-only) is for the caller to show."""
        path = self.path()
        path.parent.mkdir(parents=True, exist_ok=True)
        data = {
            "last_model": self.last_model,
            "defaults": self.defaults.as_dict(),
            "presets": {name: s.as_dict() for name, s in self.presets.items()},
            "model_presets": self.model_presets,
        }
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
