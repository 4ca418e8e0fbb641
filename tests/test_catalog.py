"""The catalog: the official quantized Apertus Mini releases, inferred ids marked unconfirmed,
and a 404 for one of those said as such."""

from __future__ import annotations

import pytest

from apertus_mlx import hub
from apertus_mlx.errors import ModelNotFoundError


def test_official_quantized_releases_are_listed():
    repos = {e.repo: e for e in hub.catalog()}
    for size in ("0.5B", "1.5B", "4B"):
        for bits in (2, 3, 4, 6):
            entry = repos[f"swiss-ai/Apertus-v1.1-{size}-Instruct-MLX-INT{bits}"]
            assert entry.format == f"mlx-int{bits}" and entry.context == 4096
            confirmed = (size, bits) == ("4B", 4)
            assert entry.unconfirmed is not confirmed
    assert hub.recommended().repo == "swiss-ai/Apertus-v1.1-4B-Instruct-MLX-INT4"
    assert len({e.alias for e in hub.catalog()}) == len(hub.catalog())


def test_a_404_for_an_inferred_id_says_it_was_inferred(tmp_path, monkeypatch):
    from huggingface_hub import constants

    from tests.hub_server import FakeHub

    with FakeHub({}) as served:
        monkeypatch.setattr(constants, "ENDPOINT", served.url)
        template = served.url + "/{repo_id}/resolve/{revision}/{filename}"
        monkeypatch.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE", template)
        monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
        monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf"))
        with pytest.raises(ModelNotFoundError) as e:
            hub.download("apertus-mini-0.5b-int2")
        assert str(e.value) == (
            "swiss-ai/Apertus-v1.1-0.5B-Instruct-MLX-INT2: the repo id was inferred from the "
            "naming and is not published (yet)"
        )
        with pytest.raises(ModelNotFoundError) as e:
            hub.download("someone/not-in-the-catalog")
        assert "inferred" not in str(e.value)
