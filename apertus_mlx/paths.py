"""Where the app keeps what it writes: history, settings, saved caches, the output filter.

`APERTUS_MLX_HOME` moves all of it to one directory (tests and portable installs use it);
otherwise platformdirs' per-user data and config directories. Model weights are not here:
they live in the standard Hugging Face cache (`HF_HOME` / `HF_HUB_CACHE`).
"""

from __future__ import annotations

import os
from pathlib import Path

APP_NAME = "apertus-mlx"
HOME_ENV = "APERTUS_MLX_HOME"


def _home() -> Path | None:
    home = os.environ.get(HOME_ENV)
    return Path(home).expanduser() if home else None


def data_dir() -> Path:
    """History database, saved KV caches, the installed output filter. Not created here."""
    home = _home()
    if home is not None:
        return home
    from platformdirs import user_data_path

    return user_data_path(APP_NAME, appauthor=False)


def caches_dir() -> Path:
    """Saved KV caches of conversations (`saved_caches`): the one place that says where."""
    return data_dir() / "caches"


def config_dir() -> Path:
    """The chat's settings (config.json). Not created here."""
    home = _home()
    if home is not None:
        return home
    from platformdirs import user_config_path

    return user_config_path(APP_NAME, appauthor=False)
