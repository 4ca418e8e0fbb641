"""A quantized KV cache: close to the float cache, through the compiled forward too, saved and
loaded like any other, and refused where head_dim cannot be grouped."""

from __future__ import annotations

import json
import subprocess
import sys

import mlx.core as mx
import numpy as np
import pytest

from apertus_mlx.errors import UsageError
from apertus_mlx.forward import Forward
from apertus_mlx.loading import load_model
from apertus_mlx.saved_caches import SavedCaches, identity
from tests.checkpoints import build_checkpoint


@pytest.fixture(scope="module")
def wide_heads(tmp_path_factory, tokenizer_dir, vocab_size):
    """head_dim 64, as every Apertus checkpoint has (the fixtures' 16 cannot be grouped), and
    grouped-query attention as in Apertus (16 query heads over 4 KV heads in the 0.5B): 2 KV
    heads with 3 query heads each, so a query head reading another head's keys shows."""
    out = tmp_path_factory.mktemp("wide-heads")
    shape = {"hidden_size": 128, "num_attention_heads": 6, "num_key_value_heads": 2,
             "head_dim": 64}  # fmt: skip
    return build_checkpoint(out, tokenizer_dir, vocab_size, shape)


def next_token_logprobs(model, ids: list[int], bits: int | None) -> np.ndarray:
    cache = model.make_cache(bits=bits)
    rows = [model(mx.array([ids[:20]]), cache=cache)[0]]
    rows += [model(mx.array([[t]]), cache=cache)[0] for t in ids[20:]]
    out = mx.concatenate(rows).astype(mx.float32)
    return np.array(out - mx.logsumexp(out, axis=-1, keepdims=True))


@pytest.mark.parametrize(("bits", "max_kl", "min_top1"), [(8, 1e-4, 0.97), (4, 1e-3, 0.7)])
def test_quantized_cache_stays_close_to_the_float_one(wide_heads, vocab_size, bits, max_kl,
                                                       min_top1):  # fmt: skip
    model = load_model(wide_heads)
    ids = np.random.default_rng(0).integers(0, vocab_size, 60).tolist()
    ref, got = next_token_logprobs(model, ids, None), next_token_logprobs(model, ids, bits)
    kl = np.mean(np.sum(np.exp(ref) * (ref - got), axis=-1))
    top1 = np.mean(ref.argmax(-1) == got.argmax(-1))
    assert 0 < kl < max_kl and top1 >= min_top1


def test_8_bit_attention_gives_the_float_caches_logits(wide_heads, vocab_size):
    """Prompt chunk and decoded tokens, eager and through the compiled forward `generate` uses:
    the logits stay within 0.05 of the float cache's. Rounding to 8 bits moves each cached key
    and value by at most half a step (1/510 of its group's range); here that moved the logits
    by at most 0.008 (their spread is about 0.24), so 0.05 leaves room for other weights and
    backends, while query heads reading the wrong KV head move them by about 1."""
    model = load_model(wide_heads)
    assert model.args.num_attention_heads // model.args.num_key_value_heads == 3
    ids = np.random.default_rng(0).integers(0, vocab_size, 60).tolist()
    ref, eager = next_token_logprobs(model, ids, None), next_token_logprobs(model, ids, 8)
    forward, cache = Forward(model), model.make_cache(bits=8)
    rows = [np.array(forward.prefill(ids[:20], cache))]
    rows += [np.array(forward(mx.array([[t]]), cache)[0, -1:]) for t in ids[20:]]
    compiled = np.concatenate(rows)
    compiled = compiled - np.log(np.exp(compiled).sum(-1, keepdims=True))
    for got in (eager[19:], compiled):
        assert np.abs(got - ref[19:]).max() < 0.05
        assert np.mean(got.argmax(-1) == ref[19:].argmax(-1)) >= 0.95  # near-ties may flip


def test_compiled_forward_reads_and_writes_quantized_buffers(wide_heads, vocab_size):
    model = load_model(wide_heads)
    ids = np.random.default_rng(1).integers(0, vocab_size, 30).tolist()
    eager = next_token_logprobs(model, ids, 8)
    forward, cache = Forward(model), model.make_cache(bits=8)
    cache.step = 16  # grow the packed buffers, scales and biases while decoding
    rows = [np.array(forward.prefill(ids[:20], cache))]
    rows += [np.array(forward(mx.array([[t]]), cache)[0, -1:]) for t in ids[20:]]
    got = np.concatenate(rows)
    got = got - np.log(np.exp(got).sum(-1, keepdims=True))
    np.testing.assert_allclose(got, eager[19:], atol=1e-4)
    assert all(isinstance(k, tuple) and k[0].dtype == mx.uint32 for k in cache.keys)


def test_a_quantized_cache_is_saved_and_loaded(wide_heads, tmp_path):
    model = load_model(wide_heads)
    ids = list(range(100, 140))
    cache = model.make_cache(bits=4)
    model(mx.array([ids]), cache=cache)
    saved, ident = SavedCaches(tmp_path), identity(model, "m", None, bits=4)
    saved.save("q", cache, ident)
    loaded = saved.load("q", model.make_cache(bits=4), ident).cache
    assert loaded.tokens == ids and loaded.bits == 4
    for a, b in zip(cache.arrays(), loaded.arrays()):
        np.testing.assert_array_equal(np.array(a[..., :40, :]), np.array(b[..., :40, :]))
    # a float cache of the same model cannot use it
    assert saved.load("q", model.make_cache(), identity(model, "m", None)).cache is None


def test_heads_that_cannot_be_grouped_are_refused(tiny_model_dir):
    model = load_model(tiny_model_dir)
    assert model.args.head_dim == 16
    with pytest.raises(UsageError, match="head_dim"):
        model.make_cache(bits=8)


def test_generate_kv_bits(wide_heads):
    out = subprocess.run(
        [sys.executable, "-m", "apertus_mlx", "generate", "Grüezi", "-m", str(wide_heads),
         "--temp", "0", "-n", "6", "--kv-bits", "8", "--json"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["generated_tokens"] >= 1
