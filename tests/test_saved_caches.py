"""Saved KV caches: a continued conversation skips reading its history again, answers as a cold
start would, and the directory stays within its budget."""

from __future__ import annotations

import json
import os

import mlx.core as mx
import numpy as np

from apertus_mlx.loading import load_model
from apertus_mlx.saved_caches import SavedCaches, identity
from tests.checkpoints import cli
from tests.test_history_cli import home  # noqa: F401 - the fixture


def filled(model, ids: list[int]):
    cache = model.make_cache()
    model(mx.array([ids]), cache=cache)
    mx.eval(cache.arrays())
    return cache


def test_save_load_roundtrip_and_identity(tiny_model_dir, tmp_path):
    model = load_model(tiny_model_dir)
    ids = list(range(100, 140))
    cache = filled(model, ids)
    saved = SavedCaches(tmp_path)
    ident = identity(model, "some/model", "abc")
    saved.save("c1", cache, ident)
    loaded = saved.load("c1", model.make_cache(), ident)
    assert loaded.note is None
    assert loaded.cache.tokens == ids and loaded.cache.offset == 40
    for a, b in zip(cache.arrays(), loaded.cache.arrays()):
        np.testing.assert_array_equal(np.array(a[..., :40, :]), np.array(b[..., :40, :]))
    assert saved.load("nothing-here", model.make_cache(), ident).cache is None


def test_a_foreign_or_damaged_cache_is_reported_and_removed(tiny_model_dir, tmp_path):
    """Another revision, another model, other bits, a truncated file: not used, said once,
    and gone, so the next save replaces it."""
    model = load_model(tiny_model_dir)
    ids = list(range(100, 140))
    saved = SavedCaches(tmp_path)
    ident = identity(model, "some/model", "abc")
    file = tmp_path / "c1.safetensors"
    for other, what in (
        ({**ident, "revision": "def"}, "revision"),
        ({**ident, "model": "other/model"}, "model"),
        (identity(model, "some/model", "abc", bits=8), "kv_bits"),
    ):
        saved.save("c1", filled(model, ids), ident)
        loaded = saved.load("c1", model.make_cache(), other)
        assert loaded.cache is None and what in loaded.note and not file.exists()
    saved.save("c1", filled(model, ids), ident)
    file.write_bytes(file.read_bytes()[:-100])
    loaded = saved.load("c1", model.make_cache(), ident)
    assert loaded.cache is None and "damaged" in loaded.note and not file.exists()
    assert saved.load("c1", model.make_cache(), ident).note is None  # said once


def test_reuse_keeps_the_common_prefix_and_the_last_token_to_read(tiny_model_dir):
    model = load_model(tiny_model_dir)
    cache = filled(model, list(range(100, 120)))
    assert cache.keep_prefix(list(range(100, 110)) + [7, 8]) == 10
    assert cache.offset == 10 and cache.tokens == list(range(100, 110))
    cache = filled(model, list(range(100, 120)))
    assert cache.keep_prefix(list(range(100, 120))) == 19


def test_least_recently_used_files_go_first(tiny_model_dir, tmp_path):
    model = load_model(tiny_model_dir)
    ids = list(range(100, 164))
    ident = identity(model, "m", None)
    probe = SavedCaches(tmp_path / "probe")
    probe.save("x", filled(model, ids), ident)
    size = (tmp_path / "probe" / "x.safetensors").stat().st_size
    saved = SavedCaches(tmp_path / "c", budget=int(2.5 * size))
    for key in ("a", "b"):
        saved.save(key, filled(model, ids), ident)
    os.utime(tmp_path / "c" / "a.safetensors", (1, 1))  # a: long unused
    saved.load("b", model.make_cache(), ident)
    saved.save("c", filled(model, ids), ident)
    assert sorted(f.stem for f in (tmp_path / "c").glob("*.safetensors")) == ["b", "c"]


def test_continue_reuses_the_saved_cache_and_answers_as_a_cold_start(home, tiny_model_dir):  # noqa: F811
    model = str(tiny_model_dir)
    out = cli("generate", "Grüezi mitenand!", "-m", model, "--temp", "0", "-n", "8", "--save")
    assert out.returncode == 0, out.stderr
    cid = out.stderr.split("saved as ")[1].split()[0]
    assert (home / "caches" / f"{cid}.safetensors").is_file()

    warm = json.loads(cli("generate", "Und wie gaht's?", "--continue", cid, "--json").stdout)
    assert warm["cached_tokens"] > 0
    assert warm["prefilled_tokens"] == warm["prompt_tokens"] - warm["cached_tokens"]

    # The same turn again from a cold start: the saved cache is gone, the answer is the same.
    assert cli("history", "rm", cid, "--yes").returncode == 0
    assert not (home / "caches" / f"{cid}.safetensors").exists()  # deleted with the history
    out = cli("generate", "Grüezi mitenand!", "-m", model, "--temp", "0", "-n", "8", "--save")
    cid2 = out.stderr.split("saved as ")[1].split()[0]
    (home / "caches" / f"{cid2}.safetensors").unlink()
    cold = json.loads(cli("generate", "Und wie gaht's?", "--continue", cid2, "--json").stdout)
    assert cold["cached_tokens"] == 0 and cold["prompt_tokens"] == warm["prompt_tokens"]
    assert cold["text"] == warm["text"]


def test_continue_leaves_out_the_oldest_turns_that_no_longer_fit(home, tiny_model_dir):  # noqa: F811
    """The fixture's context is 512 tokens: a third long turn cannot keep the first."""
    model, long = str(tiny_model_dir), "Grüezi mitenand, " * 40
    out = cli("generate", long, "-m", model, "--temp", "0", "-n", "100", "--save")
    cid = out.stderr.split("saved as ")[1].split()[0]
    second = cli("generate", long, "--continue", cid, "--json")
    assert second.returncode == 0, second.stderr
    third = cli("generate", long, "--continue", cid, "--json")
    assert third.returncode == 0, third.stderr
    assert "oldest messages are left out" in third.stderr
    done = json.loads(third.stdout)
    assert done["prompt_tokens"] + 100 <= 512 and done["generated_tokens"] > 0
