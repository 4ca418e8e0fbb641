"""Which model a request names: the one given at start (by that name, its alias, repo id or
folder name), a catalog alias or a repo id already in the Hugging Face cache. A request never
downloads, and never names an arbitrary folder of this machine: only the one given at start."""

from __future__ import annotations

import os
import time
from pathlib import Path

from .errors import ApiError


class ModelNames:
    def __init__(self, start: str | None):
        self.start = start
        self._start_key: str | None = None
        self._start_names: set[str] = set()
        if start is not None:
            from ..hub import catalog_entry, model_identity, resolve_model

            path = resolve_model(start)  # ModelNotFoundError: the command fails at once
            model_id, _ = model_identity(start)
            self._start_key = model_id
            names = {start, model_id, Path(path).name, Path(model_id).name}
            entry = catalog_entry(model_id)
            if entry is not None:
                names |= {entry.alias, entry.repo}
            self._start_names = {n for n in names if n}

    @property
    def default(self) -> str | None:
        return self._start_key

    def resolve(self, name: str | None) -> str:
        """The key of the model `name` means (loading it is the scheduler's job), else 404."""
        if not name or name in self._start_names:
            if self._start_key is None:
                raise ApiError(
                    400, "no model was given at start: name one in `model`", param="model"
                )
            return self._start_key
        from ..errors import ApertusError
        from ..hub import looks_like_repo_id, repo_for, resolve_model

        repo = repo_for(name)
        if looks_like_repo_id(repo) and not Path(name).expanduser().exists():
            try:
                resolve_model(repo)  # the local cache only
                return repo
            except ApertusError:
                pass
        raise ApiError(
            404,
            f"the model {name!r} is not on this machine (this server "
            "never downloads: run `apertus-mlx download` first)",
            param="model",
            code="model_not_found",
        )

    def locate(self, key: str) -> tuple[str, str, str | None]:
        """(path to load, model id, revision) of a resolved key."""
        from ..hub import model_identity, resolve_model

        source = self.start if key == self._start_key else key
        model_id, revision = model_identity(source)
        return str(resolve_model(source)), model_id, revision

    def listing(self) -> list[dict]:
        """GET /v1/models: the model given at start, the cached Apertus models and the
        catalog's aliases; `owned_by` says which."""
        from ..errors import ApertusError
        from ..hub import catalog

        now = int(time.time())
        rows: dict[str, str] = {}
        if self._start_key is not None:
            local = os.path.isdir(self._start_key)
            rows[self._start_key] = "local" if local else "cache"
        try:
            from ..hub import cached_models

            for repo in cached_models():
                if "apertus" in repo.lower():
                    rows.setdefault(repo, "cache")
        except ApertusError:
            pass
        for entry in catalog():
            rows.setdefault(entry.alias, "catalog")
        return [
            {"id": name, "object": "model", "created": now, "owned_by": owner}
            for name, owner in rows.items()
        ]
