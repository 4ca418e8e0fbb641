"""Loading: formats, dtypes, and one clear typed error for every kind of bad checkpoint."""

from __future__ import annotations

import json
import shutil

import mlx.core as mx
import numpy as np
import pytest

from apertus_mlx.config import ModelArgs
from apertus_mlx.errors import (
    ConfigError,
    CorruptCheckpointError,
    ModelNotFoundError,
    UnsupportedModelError,
    WeightsError,
)
from apertus_mlx.hub import resolve_model
from apertus_mlx.loading import load_model


@pytest.fixture
def broken(tmp_path, tiny_model_dir):
    """A fresh copy of the tiny checkpoint to break."""
    out = tmp_path / "ckpt"
    shutil.copytree(tiny_model_dir, out)
    return out


def edit_config(path, **changes):
    cfg = json.loads((path / "config.json").read_text())
    cfg.update(changes)
    (path / "config.json").write_text(json.dumps(cfg))


def rewrite_weights(path, edit):
    from safetensors.numpy import load_file, save_file

    weights = load_file(str(path / "model.safetensors"))
    edit(weights)
    save_file(weights, str(path / "model.safetensors"))


def test_dtype_override_and_default(tiny_model_dir):
    assert load_model(tiny_model_dir, dtype="bfloat16").model.norm.weight.dtype == mx.bfloat16
    # CPU backend: float32 is what it computes fastest
    assert load_model(tiny_model_dir).model.norm.weight.dtype == mx.float32


def test_config_reads_both_rope_spellings():
    common = dict(
        model_type="apertus",
        hidden_size=64,
        num_attention_heads=4,
        num_hidden_layers=1,
        intermediate_size=8,
        vocab_size=8,
        post_norm=False,
    )
    rope = {
        "factor": 8,
        "low_freq_factor": 1,
        "high_freq_factor": 4,
        "original_max_position_embeddings": 8192,
    }
    legacy = ModelArgs.from_dict(
        {**common, "rope_theta": 12e6, "rope_scaling": {**rope, "type": "llama3"}}
    )
    v5 = ModelArgs.from_dict(
        {**common, "rope_parameters": {**rope, "rope_type": "llama3", "rope_theta": 12e6}}
    )
    assert legacy == v5
    assert legacy.rope_scaling.factor == 8 and legacy.rope_theta == 12e6
    assert legacy.head_dim == 16 and legacy.num_key_value_heads == 4
    plain = ModelArgs.from_dict({**common, "rope_theta": 5e5, "rope_scaling": None})
    assert plain.rope_scaling is None and plain.rope_theta == 5e5


def test_no_config(tmp_path):
    with pytest.raises(ConfigError, match="no config.json"):
        load_model(tmp_path)


def test_other_model_type(broken):
    edit_config(broken, model_type="llama")
    with pytest.raises(UnsupportedModelError, match="'llama'"):
        load_model(broken)


def test_missing_key_in_config(broken):
    cfg = json.loads((broken / "config.json").read_text())
    del cfg["hidden_size"]
    (broken / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ConfigError, match="hidden_size"):
        load_model(broken)


def test_truncated_safetensors(broken):
    file = broken / "model.safetensors"
    data = file.read_bytes()
    file.write_bytes(data[: len(data) // 2])
    with pytest.raises(CorruptCheckpointError, match="truncated"):
        load_model(broken)


def test_garbage_safetensors(broken):
    (broken / "model.safetensors").write_bytes(b"\xff" * 64)
    with pytest.raises(CorruptCheckpointError):
        load_model(broken)


def test_missing_tensor(broken):
    rewrite_weights(broken, lambda w: w.pop("model.layers.1.mlp.up_proj.weight"))
    with pytest.raises(WeightsError, match=r"1 missing: model\.layers\.1\.mlp\.up_proj\.weight"):
        load_model(broken)


def test_wrong_shape_and_unexpected_tensor(broken):
    def edit(w):
        w["model.norm.weight"] = np.ones(3, dtype=np.float32)
        w["model.extra.weight"] = np.ones(2, dtype=np.float32)

    rewrite_weights(broken, edit)
    with pytest.raises(WeightsError, match="unexpected: model.extra.weight") as err:
        load_model(broken)
    assert "model.norm.weight (3,) (expected (64,))" in str(err.value)


def test_alpha_scalars_of_either_shape_and_optional_buffers(broken, tiny_model_dir):
    def edit(w):
        for k in list(w):
            if k.endswith((".alpha_p", ".alpha_n")):
                w[k] = w[k].reshape(())
            elif k.endswith((".act_fn.beta", ".act_fn.eps")):
                del w[k]

    rewrite_weights(broken, edit)
    ids = mx.array([[1, 2, 3, 4]])
    ours = np.array(load_model(broken)(ids))
    ref = np.array(load_model(tiny_model_dir)(ids))
    np.testing.assert_allclose(ours, ref, rtol=1e-5, atol=1e-6)


def test_stray_lm_head_dropped_when_tied(tmp_path, checkpoint):
    src = checkpoint("tied-mha-f32")
    out = tmp_path / "tied"
    shutil.copytree(src, out)

    def edit(w):
        w["lm_head.weight"] = w["model.embed_tokens.weight"] * 0

    rewrite_weights(out, edit)
    ids = mx.array([[5, 6, 7]])
    np.testing.assert_allclose(np.array(load_model(out)(ids)), np.array(load_model(src)(ids)))


def test_sharded_index_names_a_missing_shard(tmp_path, checkpoint):
    out = tmp_path / "sharded"
    shutil.copytree(checkpoint("tied-bf16-sharded"), out)
    next(out.glob("model-00002-*.safetensors")).unlink()
    with pytest.raises(CorruptCheckpointError, match="missing"):
        load_model(out)


def test_unknown_model_name_gets_a_hint(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    with pytest.raises(ModelNotFoundError, match="apertus-mlx download swiss-ai/Nope"):
        resolve_model("swiss-ai/Nope")
    with pytest.raises(ModelNotFoundError):
        resolve_model(str(tmp_path / "no-such-dir"))
