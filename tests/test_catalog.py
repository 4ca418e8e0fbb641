"""The catalog: the official quantized Apertus Mini releases, inferred ids marked unconfirmed,
and a 404 for one of those said as such."""

from __future__ import annotations

import pytest

from apertus_mlx import hub
from apertus_mlx.errors import ModelNotFoundError

# the MLX ids a public listing of swiss-ai's repos shows (the release: 3-6 bits per weight)
PUBLISHED = {("4B", 3), ("4B", 4), ("4B", 6), ("1.5B", 3), ("1.5B", 4), ("0.5B", 4)}


def test_official_quantized_releases_are_listed():
    repos = {e.repo: e for e in hub.catalog()}
    for size in ("0.5B", "1.5B", "4B"):
        assert f"swiss-ai/Apertus-v1.1-{size}-Instruct-MLX-INT2" not in repos  # never seen
        for bits in (3, 4, 6):
            entry = repos[f"swiss-ai/Apertus-v1.1-{size}-Instruct-MLX-INT{bits}"]
            assert entry.format == f"mlx-int{bits}" and entry.context == 4096
            assert entry.unconfirmed is ((size, bits) not in PUBLISHED)
    assert hub.recommended().repo == "swiss-ai/Apertus-v1.1-4B-Instruct-MLX-INT4"
    assert len({e.alias for e in hub.catalog()}) == len(hub.catalog())


def test_a_404_for_an_unconfirmed_id_says_not_found_yet(tmp_path, monkeypatch):
    from huggingface_hub import constants

    from tests.hub_server import FakeHub, point_client_at

    with FakeHub({}) as served:
        point_client_at(monkeypatch, served.url)
        monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf"))
        with pytest.raises(ModelNotFoundError) as e:
            hub.download("apertus-mini-0.5b-int3")
        assert str(e.value) == (
            "swiss-ai/Apertus-v1.1-0.5B-Instruct-MLX-INT3: not found on the hub yet (the "
            "catalog lists it by the publisher's naming)"
        )
        with pytest.raises(ModelNotFoundError) as e:
            hub.download("someone/not-in-the-catalog")
        assert "yet" not in str(e.value)
