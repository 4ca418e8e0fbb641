"""Speculative decoding: greedy output equals plain decoding, sampling keeps the model's
distribution, caches hold exactly what was fed, mismatched drafts are refused."""

from __future__ import annotations

import json
import threading

import mlx.core as mx
import numpy as np
import pytest

from apertus_mlx.errors import DraftMismatchError, UsageError
from apertus_mlx.generate import Chunk, Done, generate
from apertus_mlx.loading import load_model
from apertus_mlx.sampling import SamplingParams, make_distribution
from apertus_mlx.speculative import Draft, check_tokenizers, load_draft, verify
from apertus_mlx.tokenizer import load_tokenizer
from tests.checkpoints import build_checkpoint, cli
from tests.distributions import expected_distribution

GREEDY = SamplingParams(temperature=0)
PROMPTS = [[1, 65, 300, 301, 302, 66, 67], [1, 200, 201], list(range(50, 90))]


@pytest.fixture(scope="module")
def target(tiny_model_dir):
    return load_model(tiny_model_dir), load_tokenizer(tiny_model_dir)


@pytest.fixture(scope="module")
def other_dir(tmp_path_factory, tokenizer_dir, vocab_size):
    """A smaller, differently seeded checkpoint with the same tokenizer: it disagrees often."""
    out = tmp_path_factory.mktemp("draft")
    return build_checkpoint(out, tokenizer_dir, vocab_size, {"num_hidden_layers": 1}, seed=1)


@pytest.fixture(scope="module")
def other(other_dir):
    return load_model(other_dir)


def run(model, tokenizer, ids, **kwargs) -> Done:
    kwargs.setdefault("end_tokens", ())
    events = list(generate(model, tokenizer, ids, **kwargs))
    assert "".join(e.text for e in events if isinstance(e, Chunk)) == events[-1].text
    return events[-1]


@pytest.mark.parametrize("ids", PROMPTS)
@pytest.mark.parametrize("k", [1, 3, 5])
def test_greedy_output_equals_plain_decoding(target, other, ids, k):
    model, tokenizer = target
    plain = run(model, tokenizer, ids, params=GREEDY, max_tokens=30)
    for draft_model in (model, other):
        draft = Draft(draft_model, num_tokens=k)
        fast = run(model, tokenizer, ids, params=GREEDY, max_tokens=30, draft=draft)
        assert fast.tokens == plain.tokens
        assert fast.text == plain.text
        s = fast.stats
        assert s.num_draft_tokens == k and s.finish_reason == "length"
        assert s.draft_tokens > 0 and 0 <= s.accepted_tokens <= s.draft_tokens
    # the model as its own draft always agrees; the other one often does not
    self_stats = run(model, tokenizer, ids, params=GREEDY, max_tokens=30, draft=Draft(model, k))
    assert self_stats.stats.acceptance_rate == 1.0
    other_stats = run(model, tokenizer, ids, params=GREEDY, max_tokens=30, draft=Draft(other, k))
    assert other_stats.stats.acceptance_rate < 0.5


def test_greedy_with_repetition_penalty_equals_transformers(target, other, tiny_model_dir):
    """Plain and speculative decoding with a penalty give transformers' greedy answer: the
    penalty sees the drafted tokens before each verified position, as plain decoding sees the
    tokens it generated."""
    import torch

    from tests.checkpoints import reference_model

    model, tokenizer = target
    params = SamplingParams(temperature=0, repetition_penalty=1.5)
    reference = reference_model(tiny_model_dir)
    for ids in PROMPTS:
        want = reference.generate(
            torch.tensor([ids]),
            do_sample=False,
            repetition_penalty=1.5,
            max_new_tokens=25,
            min_new_tokens=25,
            eos_token_id=None,
            pad_token_id=0,
        )[0, len(ids) :].tolist()
        plain = run(model, tokenizer, ids, params=params, max_tokens=25)
        assert plain.tokens == want
        for draft_model in (model, other):
            draft = Draft(draft_model, num_tokens=4)
            assert run(model, tokenizer, ids, params=params, max_tokens=25, draft=draft).tokens == (
                plain.tokens
            )


def chi_square(counts: np.ndarray, probs: np.ndarray) -> float:
    expected = counts.sum() * probs
    keep = expected > 0
    assert counts[~keep].sum() == 0  # nothing outside the support
    return float((((counts - expected) ** 2)[keep] / expected[keep]).sum())


def test_rejection_sampling_keeps_the_models_distribution():
    """Many rounds at once over a 6-token vocabulary with fixed distributions: the first token
    follows p1, and the second, after the first draft was accepted, follows p2. The draft's
    q differs a lot from p, and truncation (a zero in p, in q) is covered."""
    V, N, k = 6, 40000, 2
    p = np.array(
        [
            [0.05, 0.40, 0.10, 0.30, 0.15, 0.00],
            [0.25, 0.05, 0.30, 0.00, 0.10, 0.30],
            [0.20, 0.20, 0.20, 0.20, 0.10, 0.10],
        ]
    )
    q = np.array([[0.30, 0.10, 0.00, 0.30, 0.10, 0.20], [0.10, 0.50, 0.10, 0.20, 0.10, 0.00]])
    key = mx.random.key(0)
    k1, k2, k3 = mx.random.split(key, 3)
    with np.errstate(divide="ignore"):
        lp, lq = mx.array(np.log(p), mx.float32), mx.array(np.log(q), mx.float32)
    drafts = mx.random.categorical(mx.broadcast_to(lq, (N, k, V)), key=k1).astype(mx.int32)
    uniforms = mx.random.uniform(shape=(N, k), key=k2)
    n, after = verify(
        mx.broadcast_to(lp, (N, k + 1, V)),
        mx.broadcast_to(lq, (N, k, V)),
        drafts,
        uniforms,
        lambda logits: mx.random.categorical(logits, key=k3),
    )
    n, after, drafts = np.array(n), np.array(after), np.array(drafts)
    first = np.where(n >= 1, drafts[:, 0], after[:, 0])
    counts = np.bincount(first, minlength=V)
    assert chi_square(counts, p[0]) < 20.5  # chi-square, 5 degrees of freedom, p = 0.001
    assert 0.5 * np.abs(counts / N - p[0]).sum() < 0.01
    went_on = n >= 1
    second = np.where(n >= 2, drafts[:, 1], after[np.arange(N), np.minimum(n, k)])[went_on]
    assert chi_square(np.bincount(second, minlength=V), p[1]) < 20.5
    # acceptance of the first draft is sum_x min(p1(x), q1(x))
    assert abs(went_on.mean() - np.minimum(p[0], q[0]).sum()) < 0.01


def test_the_distributions_compared_are_transformers():
    """`make_distribution` (the model's and the draft's distributions that speculative decoding
    compares) is what transformers samples from: temperature, then top-k, top-p and min-p (each
    cuts tokens in one of these settings); greedy puts all the mass on the most likely token."""
    logits = np.random.default_rng(0).normal(size=12) * 2
    logprobs = mx.array(logits - np.log(np.exp(logits).sum()), mx.float32)[None]
    for settings in (
        dict(temperature=0.7, top_k=8, top_p=0.9, min_p=0.05),
        dict(temperature=1.5, top_k=10, top_p=1.0, min_p=0.2),
        dict(temperature=0.5, top_k=0, top_p=0.8),
    ):
        want = expected_distribution(logits, **settings)
        got = np.exp(np.array(make_distribution(SamplingParams(**settings))(logprobs))[0])
        np.testing.assert_allclose(got, want, atol=1e-6)
    greedy = np.exp(np.array(make_distribution(GREEDY)(logprobs))[0])
    np.testing.assert_array_equal(greedy, np.eye(12)[np.argmax(logits)])


def test_sampling_is_repeatable_and_stays_in_the_truncated_support(target, other):
    model, tokenizer = target
    params = SamplingParams(temperature=1.0, top_k=5, seed=11)
    a = run(model, tokenizer, [1, 200, 201], params=params, max_tokens=20, draft=Draft(other))
    b = run(model, tokenizer, [1, 200, 201], params=params, max_tokens=20, draft=Draft(other))
    assert a.tokens == b.tokens and a.stats.generated_tokens == 20
    # every token is among the model's 5 most likely after the tokens before it
    ids = [1, 200, 201] + a.tokens
    logits = model(mx.array([ids]))[0, 2:-1]
    top5 = np.argsort(-np.array(logits), axis=-1)[:, :5]
    assert all(t in row for t, row in zip(a.tokens, top5))


def test_caches_hold_what_was_fed_and_serve_the_next_turn(target, other):
    """After a run the model's cache holds the prompt and every token but the last, the
    draft's a prefix of that; a follow-up reading from both equals a fresh run."""
    model, tokenizer = target
    prompt = list(range(50, 90))
    cache, draft = model.make_cache(), Draft(other, 3)
    first = run(model, tokenizer, prompt, params=GREEDY, max_tokens=13, cache=cache, draft=draft)
    fed = prompt + first.tokens[:-1]
    assert cache.offset == len(fed)
    assert cache.tokens == fed
    assert draft.cache.tokens == fed[: draft.cache.offset] and draft.cache.offset >= len(prompt)
    follow = fed + [60, 61]
    again = run(model, tokenizer, follow, params=GREEDY, max_tokens=9, cache=cache, draft=draft)
    assert again.stats.cached_tokens == len(fed)
    assert again.tokens == run(model, tokenizer, follow, params=GREEDY, max_tokens=9).tokens


@pytest.mark.parametrize("stop_at", [1, 2, 4, 5])
def test_stopping_mid_round_keeps_the_cache_exact(target, stop_at):
    """A stop (or the consumer leaving) between two tokens of one verified round trims what
    the model read past the last token yielded."""
    model, tokenizer = target
    stop, cache = threading.Event(), model.make_cache()
    events = generate(
        model,
        tokenizer,
        [1, 2, 3],
        params=GREEDY,
        max_tokens=50,
        cache=cache,
        stop_event=stop,
        end_tokens=(),
        draft=Draft(model, 4),  # always accepted: rounds of 5 tokens
    )
    seen = []
    for event in events:
        seen.append(event)
        if len(seen) == stop_at:
            stop.set()
    done = seen[-1]
    assert isinstance(done, Done) and done.stats.finish_reason == "interrupted"
    assert done.stats.generated_tokens == stop_at
    assert cache.offset == 3 + stop_at - 1

    cache = model.make_cache()
    events = generate(
        model, tokenizer, [1, 2, 3], params=GREEDY, cache=cache, end_tokens=(), draft=Draft(model)
    )
    for _ in range(stop_at):
        next(events)
    events.close()
    assert cache.offset == 3 + stop_at - 1


def test_end_token_inside_an_accepted_block_ends_the_answer(target, other):
    model, tokenizer = target
    free = run(model, tokenizer, [1, 5, 6], params=GREEDY, max_tokens=12).tokens
    for draft_model in (model, other):
        done = run(
            model,
            tokenizer,
            [1, 5, 6],
            params=GREEDY,
            max_tokens=12,
            end_tokens=[free[5]],
            draft=Draft(draft_model, 4),
        )
        assert done.tokens == free[: free.index(free[5]) + 1]
        assert done.stats.finish_reason == "stop"


def test_mismatched_drafts_are_refused(target, tmp_path, tokenizer_dir, vocab_size, other_dir):
    model, tokenizer = target
    small = build_checkpoint(
        tmp_path / "v", tokenizer_dir, vocab_size + 64, {"num_hidden_layers": 1}
    )
    with pytest.raises(DraftMismatchError, match="vocabulary entries"):
        load_draft(small, model, tokenizer)
    with pytest.raises(DraftMismatchError, match="vocabulary entries"):
        list(generate(model, tokenizer, [1, 2], draft=Draft(load_model(small))))

    class Shuffled:
        def vocabulary(self):
            vocab = tokenizer.vocabulary()
            a, b = sorted(vocab)[:2]
            return {**vocab, a: vocab[b], b: vocab[a]}

    with pytest.raises(DraftMismatchError, match=r"tokenizer differs.*\(2 tokens have other ids\)"):
        check_tokenizers(Shuffled(), tokenizer)
    assert load_draft(other_dir, model, tokenizer, num_tokens=2).num_tokens == 2
    with pytest.raises(UsageError, match="draft tokens"):
        Draft(model, num_tokens=0)


def test_cli_draft_model(tiny_model_dir, other_dir, tmp_path, tokenizer_dir, vocab_size):
    """--draft-model: the same greedy answer, acceptance in --json and --stats; a draft with
    another vocabulary is one line and exit status 2."""
    base = ("generate", "Grüezi", "-m", str(tiny_model_dir), "--temp", "0", "-n", "12")
    plain = json.loads(cli(*base, "--json").stdout)
    out = cli(*base, "--json", "--draft-model", str(other_dir), "--num-draft-tokens", "2")
    assert out.returncode == 0, out.stderr
    fast = json.loads(out.stdout)
    assert fast["text"] == plain["text"] and fast["generated_tokens"] == 12
    assert fast["num_draft_tokens"] == 2 and fast["draft_tokens"] > 0
    assert fast["acceptance_rate"] == fast["accepted_tokens"] / fast["draft_tokens"]
    assert plain["num_draft_tokens"] == 0 and plain["acceptance_rate"] is None
    stats = cli(*base, "--stats", "--draft-model", str(tiny_model_dir))
    assert "accepted (100%), k=3" in stats.stderr

    wide = build_checkpoint(
        tmp_path / "w", tokenizer_dir, vocab_size + 64, {"num_hidden_layers": 1}
    )
    bad = cli(*base, "--draft-model", str(wide))
    assert bad.returncode == 2 and bad.stdout == ""
    assert len(bad.stderr.strip().splitlines()) == 1 and "vocabulary" in bad.stderr


def test_bench_speculative(target, other):
    from apertus_mlx.bench import bench_speculative

    model, _ = target
    same = bench_speculative(model, model, [1, 2, 3], 9, 3, repeats=1)
    never = bench_speculative(model, other, [1, 2, 3], 9, 2, repeats=1)
    assert same.acceptance_rate == 1.0 and never.acceptance_rate < 0.5
    assert min(same.plain_tps, same.speculative_tps, never.speculative_tps) > 0


def sharpened(path, scale: float, noise: float = 0.0):
    """The checkpoint with its output head scaled (a random head gives nearly flat
    distributions) and Gaussian noise of `noise` times the head's spread added."""
    model = load_model(path)
    head = model.lm_head.weight * scale
    noise = mx.random.normal(head.shape, key=mx.random.key(1)) * noise * mx.std(head)
    model.update({"lm_head": {"weight": head + noise}})
    return model


def test_sampled_tokens_follow_the_model_end_to_end(tiny_model_dir):
    """Through the real token layer (a draft step, one verification pass, repetition penalty,
    temperature, top-k): the first token's frequencies are the model's processed
    distribution, though the draft's differs (a flatter, noisy output head) and is often
    rejected."""
    from apertus_mlx.generate import Forward
    from apertus_mlx.sampling import make_logits_processors
    from apertus_mlx.speculative import DraftCounts, speculative_generate_step

    model = sharpened(tiny_model_dir, 60)
    draft = Draft(sharpened(tiny_model_dir, 20, noise=0.3), 1)
    settings = dict(temperature=1.0, top_k=4, top_p=1.0, repetition_penalty=1.3)
    params = SamplingParams(**settings)
    processors = make_logits_processors(params)
    prompt = [1, 200, 201, 202]

    def processed(m) -> np.ndarray:  # the next token's distribution, by transformers' rules
        logits = np.array(m(mx.array([prompt]))[0, -1].astype(mx.float32), dtype=np.float64)
        return expected_distribution(logits, **settings, seen=prompt)

    p, q = processed(model), processed(draft.model)
    assert (p > 0).sum() == 4 and 0.2 < np.minimum(p, q).sum() < 0.8

    mx.random.seed(0)
    forward, cache, counts, first = Forward(model), model.make_cache(), DraftCounts(), []
    for _ in range(1500):
        cache.truncate(len(prompt) - 1)
        steps = speculative_generate_step(
            prompt,
            forward,
            cache,
            draft,
            params=params,
            logits_processors=processors,
            max_tokens=2,  # one drafted token, verified
            counts=counts,
        )
        first.append(next(steps)[0])
        steps.close()
    assert chi_square(np.bincount(first, minlength=p.size), p) < 16.3  # 3 dof, p = 0.001
    assert abs(counts.accepted / counts.drafted - np.minimum(p, q).sum()) < 0.05


def test_chat_turns_with_a_draft_answer_as_without(tiny_model_dir, other):
    """Turn after turn, greedy: the same answers; the draft's cache carries over as well."""
    from apertus_mlx.settings import TurnSettings
    from apertus_mlx.turn import TurnRequest, TurnService

    model, tokenizer = load_model(tiny_model_dir), load_tokenizer(tiny_model_dir)
    settings = TurnSettings(temperature=0, max_tokens=10)
    plain = TurnService(model, tokenizer, model_id="m")
    fast = TurnService(model, tokenizer, model_id="m", draft=Draft(other, 3))
    messages: list[dict] = []
    for text in ("Grüezi!", "Und wie gaht's?", "Merci."):
        messages.append({"role": "user", "content": text})
        *_, a = (e for e in plain.start(TurnRequest.chat(messages, settings)).events
                 if isinstance(e, Done))  # fmt: skip
        held = fast.draft.cache.offset
        *_, b = (e for e in fast.start(TurnRequest.chat(messages, settings)).events
                 if isinstance(e, Done))  # fmt: skip
        assert isinstance(b, Done) and b.tokens == a.tokens
        assert b.stats.draft_tokens > 0
        if text != "Grüezi!":
            assert held > 0  # the earlier turns stayed in the draft's cache
            assert b.stats.cached_tokens > 0
        messages.append({"role": "assistant", "content": a.text, "tokens": a.tokens})
