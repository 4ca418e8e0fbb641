"""Sampling against expectations from outside the code: hand-made distributions whose answer is
known, transformers' logits processors, and token frequencies through the whole `generate`
path on a checkpoint whose next-token distribution is known by construction."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest

from apertus_mlx.generate import Done, generate
from apertus_mlx.loading import load_model
from apertus_mlx.sampling import (
    REPETITION_WINDOW,
    SamplingParams,
    apply_repetition_penalty,
    make_distribution,
    make_logits_processors,
    make_sampler,
    min_p_filter,
    top_k_filter,
    top_p_filter,
)
from apertus_mlx.tokenizer import load_tokenizer
from tests.checkpoints import build_constant_checkpoint, constant_logits
from tests.distributions import chi_square_p_value, expected_distribution, penalised

# Sampled counts pass when a correct sampler would produce worse ones less than once in a
# million runs (the seeds are fixed, so a pass is also repeatable); every mutation these
# tests are meant to catch gives p-values below 1e-20.
MIN_P_VALUE = 1e-6


def log(probs) -> mx.array:
    with np.errstate(divide="ignore"):
        return mx.array(np.log(np.array(probs, dtype=np.float64))[None], mx.float32)


def kept(logprobs: mx.array) -> set[int]:
    return set(np.flatnonzero(np.isfinite(np.array(logprobs)[0])).tolist())


def probabilities(params: SamplingParams, probs) -> np.ndarray:
    return np.exp(np.array(make_distribution(params)(log(probs)))[0].astype(np.float64))


# -- hand-made distributions -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("probs", "top_p", "want"),
    [
        ((0.5, 0.3, 0.2), 0.7, {0, 1}),  # 0.5 is short of 0.7: the second token is needed
        ((0.5, 0.3, 0.2), 0.85, {0, 1, 2}),
        ((0.95, 0.03, 0.02), 0.9, {0}),  # the top token alone exceeds p: it stays
        ((0.2, 0.5, 0.3), 0.7, {1, 2}),  # not sorted: kept by probability, not position
        ((0.1, 0.05, 0.6, 0.25), 0.5, {2}),
    ],
)
def test_top_p_keeps_the_fewest_most_likely_tokens_that_reach_p(probs, top_p, want):
    assert kept(top_p_filter(log(probs), top_p)) == want
    got = probabilities(SamplingParams(temperature=1.0, top_p=top_p), probs)
    mass = sum(probs[i] for i in want)
    np.testing.assert_allclose(got, [p / mass if i in want else 0 for i, p in enumerate(probs)],
                               rtol=1e-5)  # fmt: skip


@pytest.mark.parametrize(
    ("probs", "min_p", "want"),
    [
        ((0.5, 0.3, 0.06, 0.14), 0.2, {0, 1, 3}),  # threshold 0.2 * 0.5 = 0.1
        ((0.5, 0.3, 0.06, 0.14), 0.7, {0}),  # threshold 0.35
        ((0.3, 0.25, 0.25, 0.2), 0.8, {0, 1, 2}),  # threshold 0.24
    ],
)
def test_min_p_keeps_tokens_at_least_min_p_times_the_top_one(probs, min_p, want):
    assert kept(min_p_filter(log(probs), min_p)) == want
    got = probabilities(SamplingParams(temperature=1.0, top_p=1.0, min_p=min_p), probs)
    mass = sum(probs[i] for i in want)
    np.testing.assert_allclose(got, [p / mass if i in want else 0 for i, p in enumerate(probs)],
                               rtol=1e-5)  # fmt: skip


@pytest.mark.parametrize(
    ("probs", "k", "want"),
    [((0.1, 0.4, 0.2, 0.3), 2, {1, 3}), ((0.1, 0.4, 0.2, 0.3), 3, {1, 2, 3}), ((0.7, 0.3), 1, {0})],
)
def test_top_k_keeps_the_k_most_likely_tokens(probs, k, want):
    assert kept(top_k_filter(log(probs), k)) == want
    got = probabilities(SamplingParams(temperature=1.0, top_p=1.0, top_k=k), probs)
    mass = sum(probs[i] for i in want)
    np.testing.assert_allclose(got, [p / mass if i in want else 0 for i, p in enumerate(probs)],
                               rtol=1e-5)  # fmt: skip


@pytest.mark.parametrize("temperature", [0.5, 1.0, 2.0])
def test_temperature_divides_the_logits(temperature):
    logits = np.array([2.0, 1.0, 0.0, -1.5])
    want = np.exp(logits / temperature) / np.exp(logits / temperature).sum()
    got = probabilities(SamplingParams(temperature=temperature, top_p=1.0), np.exp(logits))
    np.testing.assert_allclose(got, want, rtol=1e-5)


def test_repetition_penalty_shrinks_the_logits_of_seen_tokens():
    """transformers' rule: a positive logit divided by the penalty, a negative one multiplied;
    tokens seen twice are penalised once; unseen ones are left alone."""
    logits = [2.0, -1.0, 0.5, 3.0, 1.0]
    seen = [0, 1, 1, 4]
    want = [1.0, -2.0, 0.5, 3.0, 0.5]
    got = apply_repetition_penalty(mx.array([logits]), mx.array(seen), 2.0)
    np.testing.assert_allclose(np.array(got)[0], want)
    (processor,) = make_logits_processors(SamplingParams(repetition_penalty=2.0))
    np.testing.assert_allclose(np.array(processor(mx.array(seen), mx.array([logits])))[0], want)
    assert make_logits_processors(SamplingParams(repetition_penalty=1.0)) == []


def test_repetition_penalty_looks_at_the_recent_window_only():
    logits = mx.array([[2.0, 2.0, 2.0]])
    (processor,) = make_logits_processors(SamplingParams(repetition_penalty=2.0))
    recent = mx.array([0] + [1] * REPETITION_WINDOW)  # token 0 fell out of the window
    np.testing.assert_allclose(np.array(processor(recent, logits))[0], [2.0, 1.0, 2.0])


@pytest.mark.parametrize(
    "settings",
    [
        dict(temperature=0.7, top_k=8, top_p=0.9, min_p=0.02),
        dict(temperature=1.3, top_k=6, top_p=0.8),  # top-p over what top-k left, renormalised
        dict(temperature=0.9, top_p=0.6, min_p=0.3),
        dict(temperature=1.0, top_k=3),
    ],
)
def test_settings_together_give_transformers_distribution(settings):
    logits = np.random.default_rng(0).normal(size=24) * 2
    want = expected_distribution(logits, **settings)
    full = {"top_p": 1.0, **settings}
    got = probabilities(SamplingParams(**full), np.exp(logits - logits.max()))
    assert set(np.flatnonzero(got)) == set(np.flatnonzero(want))
    np.testing.assert_allclose(got, want, atol=1e-6)


def test_the_sampler_draws_from_that_distribution():
    """Many rows at once (a batch): the draws' frequencies follow transformers' distribution."""
    logits = np.random.default_rng(1).normal(size=12) * 2
    settings = dict(temperature=0.8, top_k=7, top_p=0.95, min_p=0.05)
    want = expected_distribution(logits, **settings)
    sample = make_sampler(SamplingParams(**settings, seed=5))
    rows = mx.broadcast_to(log(np.exp(logits) / np.exp(logits).sum()), (20000, 12))
    draws = np.array(sample(rows))
    assert chi_square_p_value(np.bincount(draws, minlength=12), want) > MIN_P_VALUE


def test_greedy_takes_the_most_likely_token():
    lp = log([0.2, 0.5, 0.3])
    greedy = SamplingParams(temperature=0)
    assert np.array(make_sampler(greedy)(lp)).tolist() == [1]
    np.testing.assert_array_equal(probabilities(greedy, [0.2, 0.5, 0.3]), [0, 1, 0])


# -- the whole generate path, on a distribution known by construction ---------------------------

# logits of eight ordinary tokens (the rest of the vocabulary at -40)
TARGET = dict(zip(range(300, 308), [2.0, 1.6, 1.2, 0.9, 0.5, 0.2, -0.3, -1.0]))


@pytest.fixture(scope="module")
def constant(tmp_path_factory, tokenizer_dir, vocab_size):
    """(model, tokenizer, logits): a checkpoint whose next-token logits are the same after any
    input, and those logits computed with numpy from its saved weights."""
    path = build_constant_checkpoint(
        tmp_path_factory.mktemp("constant"), tokenizer_dir, vocab_size, TARGET
    )
    model, tokenizer, logits = load_model(path), load_tokenizer(path), constant_logits(path)
    for ids in ([1, 2, 3], [1, 900, 1200, 7, 7, 7]):  # the same at every position
        got = np.array(model(mx.array([ids]))[0])
        np.testing.assert_allclose(got, np.broadcast_to(logits, got.shape), atol=1e-4)
    return model, tokenizer, logits


def answer(constant, params: SamplingParams, n: int) -> list[int]:
    model, tokenizer, _ = constant
    *_, done = generate(model, tokenizer, [1, 65, 300], params=params, max_tokens=n,
                        end_tokens=())  # fmt: skip
    assert isinstance(done, Done) and len(done.tokens) == n
    return done.tokens


@pytest.mark.parametrize(
    "settings",
    [
        dict(temperature=0.6, top_p=1.0),
        dict(temperature=1.3, top_k=6, top_p=0.8, min_p=0.1),
    ],
)
def test_generated_tokens_follow_the_distribution(constant, settings):
    """Every token of one answer is an independent draw from the same known distribution."""
    logits = constant[2]
    want = expected_distribution(logits, **settings)
    tokens = answer(constant, SamplingParams(**settings, seed=3), 500)
    counts = np.bincount(tokens, minlength=want.size)
    assert set(np.flatnonzero(counts)) == set(np.flatnonzero(want > 1e-3))  # the support
    assert chi_square_p_value(counts, want) > MIN_P_VALUE


def test_generated_greedy_answer_with_repetition_penalty(constant):
    """Greedy with a penalty on a model whose logits never change: each pick is the best token
    after transformers' penalty over the prompt and the answer so far, worked out in numpy."""
    logits = constant[2]
    prompt, want = [1, 65, 300], []
    for _ in range(12):
        want.append(int(np.argmax(penalised(logits, prompt + want, 3.0))))
    got = answer(constant, SamplingParams(temperature=0, repetition_penalty=3.0), 12)
    assert got == want
    assert len(set(want)) > 3  # the penalty moved the answer on from token to token
