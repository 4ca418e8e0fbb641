"""Our logits against transformers' ApertusForCausalLM on every fixture configuration."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest
import torch

from apertus_mlx.config import ModelArgs
from apertus_mlx.loading import load_model
from apertus_mlx.model import rope_inv_freq
from tests.checkpoints import VARIANTS, reference_model

F32_VARIANTS = [n for n, v in VARIANTS.items() if v[1] == "float32"]
ALL_VARIANTS = list(VARIANTS)
LENGTH = 48  # > original_max_position_embeddings (16) of the fixtures: llama3 scaling active


def prompt(vocab_size: int, length: int = LENGTH, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, vocab_size, size=(1, length))


def reference_logits(path, ids: np.ndarray, dtype: str = "float32") -> np.ndarray:
    with torch.no_grad():
        out = reference_model(path, dtype)(torch.tensor(ids)).logits
    return out.float().numpy()


def relative_error(ours: np.ndarray, ref: np.ndarray) -> float:
    return float(np.abs(ours - ref).max() / np.abs(ref).max())


@pytest.mark.parametrize("name", ALL_VARIANTS)
@pytest.mark.parametrize("fuse", [False, True], ids=["plain", "fused"])
def test_float32_logits_match_transformers(checkpoint, vocab_size, name, fuse):
    path = checkpoint(name)
    ids = prompt(vocab_size)
    ours = np.array(load_model(path, dtype="float32", fuse=fuse)(mx.array(ids)))
    ref = reference_logits(path, ids)
    assert ours.shape == (1, LENGTH, vocab_size)
    assert relative_error(ours, ref) <= 1e-4


@pytest.mark.parametrize("name", ["gqa-llama3-bf16", "tied-bf16-sharded"])
def test_bfloat16_logits_close_to_transformers(checkpoint, vocab_size, name):
    path = checkpoint(name)
    ids = prompt(vocab_size)
    ours = np.array(load_model(path, dtype="bfloat16")(mx.array(ids)).astype(mx.float32))
    ref = reference_logits(path, ids, "bfloat16")
    assert relative_error(ours, ref) <= 0.05
    agree = (ours.argmax(-1) == ref.argmax(-1)).mean()
    assert agree >= 0.9


@pytest.mark.parametrize("name", ["gqa-llama3-f32", "tied-mha-f32", "head-dim-f32"])
def test_cached_decoding_reproduces_full_sequence(checkpoint, vocab_size, name):
    model = load_model(checkpoint(name), dtype="float32")
    ids = prompt(vocab_size)
    full = np.array(model(mx.array(ids)))
    cache = model.make_cache()
    cache.step = 8  # force several buffer growths
    steps = [np.array(model(mx.array(ids[:, :10]), cache=cache))]
    for t in range(10, LENGTH):
        steps.append(np.array(model(mx.array(ids[:, t : t + 1]), cache=cache)))
    assert cache.offset == LENGTH
    assert relative_error(np.concatenate(steps, axis=1), full) <= 1e-5


@pytest.mark.parametrize("name", ["gqa-llama3-f32", "head-dim-f32"])
def test_metal_path_ops_match_transformers(checkpoint, vocab_size, name):
    """`mx.fast` RMSNorm and RoPE, what runs on a Mac, also run (slowly) on the CPU."""
    path = checkpoint(name)
    model = load_model(path, dtype="float32", fast_ops=True)
    ids = prompt(vocab_size)
    ref = reference_logits(path, ids)
    assert relative_error(np.array(model(mx.array(ids))), ref) <= 1e-4
    cache = model.make_cache()
    steps = [np.array(model(mx.array(ids[:, :40]), cache=cache))]
    steps += [np.array(model(mx.array(ids[:, t : t + 1]), cache=cache)) for t in range(40, LENGTH)]
    assert relative_error(np.concatenate(steps, axis=1), ref) <= 1e-4


def test_cache_trim_then_continue_matches_fresh_prefill(tiny_model_dir, vocab_size):
    model = load_model(tiny_model_dir, dtype="float32")
    ids = prompt(vocab_size, 30)
    cache = model.make_cache()
    model(mx.array(ids), cache=cache)
    cache.trim(12)  # keep the first 18 positions, as a chat does with a shared prefix
    other = prompt(vocab_size, 12, seed=1)
    continued = np.array(model(mx.array(other), cache=cache))
    fresh = np.array(model(mx.array(np.concatenate([ids[:, :18], other], axis=1))))[:, 18:]
    assert relative_error(continued, fresh) <= 1e-5


@pytest.mark.parametrize("name", ["gqa-llama3-f32", "norope-scaling-f32", "head-dim-f32"])
def test_rope_inverse_frequencies_equal_transformers(checkpoint, name):
    from transformers import AutoConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    path = checkpoint(name)
    config = AutoConfig.from_pretrained(path)
    kind = config.rope_parameters["rope_type"]
    if kind == "default":
        base = config.rope_parameters["rope_theta"]
        dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        expected = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float) / dim))
    else:
        expected, _ = ROPE_INIT_FUNCTIONS[kind](config)
    ours = rope_inv_freq(ModelArgs.from_dir(path))
    np.testing.assert_allclose(ours, expected.numpy(), rtol=1e-6, atol=0)


def test_llama3_frequencies_match_published_vector():
    # Llama3InvFreqs(dim 8, theta 12e6, factor 8, low 1, high 4, original 8192):
    # the sanity vector transformers' implementation gives
    args = ModelArgs.from_dict(
        dict(
            model_type="apertus",
            hidden_size=8,
            num_attention_heads=1,
            num_hidden_layers=1,
            intermediate_size=8,
            vocab_size=8,
            rope_scaling={
                "rope_type": "llama3",
                "rope_theta": 12e6,
                "factor": 8,
                "low_freq_factor": 1,
                "high_freq_factor": 4,
                "original_max_position_embeddings": 8192,
            },
        )
    )
    np.testing.assert_allclose(
        rope_inv_freq(args), [1, 0.016990442, 3.6084392e-5, 6.1308978e-7], rtol=1e-6
    )


def test_xielu_uses_each_layers_learned_scalars(tiny_model_dir):
    from safetensors.numpy import load_file

    model = load_model(tiny_model_dir, dtype="float32")
    stored = load_file(str(tiny_model_dir / "model.safetensors"))
    x = np.array([2.0, 0.5, -1e-7, -0.5, -2.0, -30.0], dtype=np.float32)
    for i, layer in enumerate(model.layers):
        a_p = np.log1p(np.exp(float(stored[f"model.layers.{i}.mlp.act_fn.alpha_p"].reshape(()))))
        a_n = 0.5 + np.log1p(
            np.exp(float(stored[f"model.layers.{i}.mlp.act_fn.alpha_n"].reshape(())))
        )
        want = np.where(
            x > 0, a_p * x * x + 0.5 * x, a_n * (np.expm1(np.minimum(x, -1e-6)) - x) + 0.5 * x
        )
        got = np.array(layer.mlp.act_fn(mx.array(x)))
        assert (np.abs(got - want) <= 1e-6 * (np.abs(want) + np.abs(x))).all(), (got, want)
    # transformers' sanity values: alpha_p = alpha_n = 0, beta 0.5, eps -1e-6
    act = model.layers[0].mlp.act_fn
    act.alpha_p, act.alpha_n = mx.array(0.0), mx.array(0.0)
    out = act(mx.array([2.0, -2.0]))
    np.testing.assert_allclose(np.array(out), [3.772588722239781, 0.35462209218399154], rtol=1e-6)


def test_batched_logits_match_transformers(checkpoint, vocab_size):
    path = checkpoint("gqa-llama3-f32")
    ids = np.concatenate([prompt(vocab_size, 20, seed=1), prompt(vocab_size, 20, seed=2)])
    ours = np.array(load_model(path)(mx.array(ids)))
    assert ours.shape == (2, 20, vocab_size)
    assert relative_error(ours, reference_logits(path, ids)) <= 1e-4
