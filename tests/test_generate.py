"""The generation loop: greedy equals transformers, sampling is repeatable, stops are honoured."""

from __future__ import annotations

import threading

import mlx.core as mx
import numpy as np
import pytest
import torch

from apertus_mlx.errors import UsageError
from apertus_mlx.generate import Chunk, Done, Forward, generate
from apertus_mlx.loading import load_model
from apertus_mlx.sampling import SamplingParams
from apertus_mlx.stopping import StopStrings
from apertus_mlx.tokenizer import load_tokenizer
from tests.checkpoints import reference_model

GREEDY = SamplingParams(temperature=0)


def run(model, tokenizer, ids, **kwargs) -> Done:
    """Generate to the end; without `end_tokens`, none (greedy runs to max_tokens)."""
    kwargs.setdefault("end_tokens", ())
    events = list(generate(model, tokenizer, ids, **kwargs))
    assert isinstance(events[-1], Done)
    assert "".join(e.text for e in events if isinstance(e, Chunk)) == events[-1].text
    return events[-1]


@pytest.mark.parametrize("name", ["gqa-llama3-f32", "tied-mha-f32", "head-dim-f32"])
def test_greedy_tokens_equal_transformers_generate(checkpoint, name):
    path = checkpoint(name)
    model, tokenizer = load_model(path), load_tokenizer(path)
    ids = [1, 65, 300, 301, 302, 66, 67]
    ref = (
        reference_model(path)
        .generate(
            torch.tensor([ids]),
            do_sample=False,
            max_new_tokens=40,
            min_new_tokens=40,
            eos_token_id=None,
            pad_token_id=0,
        )[0, len(ids) :]
        .tolist()
    )
    done = run(model, tokenizer, ids, params=GREEDY, max_tokens=40)
    assert done.tokens == ref
    assert done.stats.finish_reason == "length"


def test_compiled_forward_matches_the_plain_pass(tiny_model_dir, vocab_size):
    """Prompt chunks, then one token at a time across a buffer growth, through the compiled
    forward: the same logits as one uncached pass over the whole sequence."""
    model = load_model(tiny_model_dir)
    ids = np.random.default_rng(3).integers(0, vocab_size, 40).tolist()
    whole = np.array(model(mx.array([ids])))[0]
    forward = Forward(model)
    cache = model.make_cache()
    cache.step = 16  # cross buffer growths while decoding
    rows = [np.array(forward.prefill(ids[:5], cache))[0]]
    for t in ids[5:]:
        rows.append(np.array(forward(mx.array([[t]]), cache))[0, -1])
    np.testing.assert_allclose(np.stack(rows), whole[4:], rtol=1e-5, atol=1e-5)
    # a block of k tokens at once (what speculative decoding verifies) equals them one by one
    cache.truncate(30)
    block = np.array(forward(mx.array([ids[30:36]]), cache))[0]
    np.testing.assert_allclose(block, whole[30:36], rtol=1e-5, atol=1e-5)


def test_chunked_prefill_equals_one_pass(tiny_model_dir, monkeypatch):
    import apertus_mlx.forward as gen

    model, tokenizer = load_model(tiny_model_dir), load_tokenizer(tiny_model_dir)
    ids = list(range(100, 180))
    whole = run(model, tokenizer, ids, params=GREEDY, max_tokens=8).tokens
    monkeypatch.setattr(gen, "MAX_CHUNK", 16)
    monkeypatch.setattr(gen, "FIRST_CHUNK", 3)
    assert run(model, tokenizer, ids, params=GREEDY, max_tokens=8).tokens == whole


def test_updated_weights_are_used_by_the_next_generation(tiny_model_dir):
    """The compiled graphs take the weights as inputs: nothing stale after `model.update`."""
    model, tokenizer = load_model(tiny_model_dir), load_tokenizer(tiny_model_dir)
    forward = Forward(model)  # one set of compiled graphs for both generations
    before = run(model, tokenizer, [1, 200, 201], params=GREEDY, max_tokens=12, forward=forward)
    layer = model.layers[0].mlp.down_proj
    model.update({"model": {"layers": [{"mlp": {"down_proj": {"weight": -layer.weight}}}]}})
    after = run(model, tokenizer, [1, 200, 201], params=GREEDY, max_tokens=12, forward=forward)
    # every decoded token, not only the first: a Forward compiled after the update agrees
    fresh = run(
        model, tokenizer, [1, 200, 201], params=GREEDY, max_tokens=12, forward=Forward(model)
    )
    assert after.tokens == fresh.tokens
    assert after.tokens != before.tokens


class StopAfter:
    """A stop event that is set from its n-th check on, counting the checks."""

    def __init__(self, n: int):
        self.n, self.checks = n, 0

    def is_set(self) -> bool:
        self.checks += 1
        return self.checks >= self.n


def test_stop_during_a_long_prompt_lands_within_a_layer(tiny_model_dir):
    """A stop requested while a slow prompt is read is seen after the layer in flight; the
    stats say what was read, with no made-up rates."""
    model, tokenizer = load_model(tiny_model_dir), load_tokenizer(tiny_model_dir)
    forward = Forward(model)
    forward.tokens_per_s = 1.0  # as slow as a large model on a CPU: chunks go layer by layer
    forward._chunk_size = lambda layers: 16
    assert len(model.layers) == 2
    stop = StopAfter(3)  # asked after each layer: the second chunk's first layer stops
    done = run(model, tokenizer, list(range(100, 400)), params=GREEDY, stop_event=stop,
               forward=forward)  # fmt: skip
    s = done.stats
    assert s.finish_reason == "interrupted"
    assert (s.prefilled_tokens, s.generated_tokens, s.ttft_s) == (16, 0, None)
    assert s.decode_tps == 0 and 0 < s.prefill_tps < 1e6
    assert done.text == "" and done.tokens == []


def test_a_first_chunk_too_slow_for_the_budget_starts_over_smaller(tiny_model_dir, monkeypatch):
    import apertus_mlx.forward as gen

    model, tokenizer = load_model(tiny_model_dir), load_tokenizer(tiny_model_dir)
    whole = run(model, tokenizer, list(range(100, 180)), params=GREEDY, max_tokens=4)
    monkeypatch.setattr(gen, "PREFILL_BUDGET_S", 1e-7)  # any first layer overruns it
    forward = Forward(model)
    again = run(model, tokenizer, list(range(100, 180)), params=GREEDY, max_tokens=4,
                forward=forward)  # fmt: skip
    assert forward.tokens_per_s is not None and forward._chunk_size(2) == 1
    assert again.tokens == whole.tokens and again.stats.prefilled_tokens == 80


def test_seed_makes_sampling_repeatable(tiny_model_dir):
    model, tokenizer = load_model(tiny_model_dir), load_tokenizer(tiny_model_dir)
    params = SamplingParams(temperature=1.0, top_p=0.95, top_k=50, min_p=0.01, seed=7)
    a = run(model, tokenizer, [1, 200, 201], params=params, max_tokens=30).tokens
    b = run(model, tokenizer, [1, 200, 201], params=params, max_tokens=30).tokens
    c = run(
        model,
        tokenizer,
        [1, 200, 201],
        params=SamplingParams(temperature=1.0, seed=8),
        max_tokens=30,
    ).tokens
    assert a == b
    assert a != c


def test_stops_on_any_end_token(tiny_model_dir):
    model, tokenizer = load_model(tiny_model_dir), load_tokenizer(tiny_model_dir)
    free = run(model, tokenizer, [1, 5, 6], params=GREEDY, max_tokens=12).tokens
    done = run(model, tokenizer, [1, 5, 6], params=GREEDY, max_tokens=12, end_tokens=[free[5]])
    assert done.tokens == free[: free.index(free[5]) + 1]
    assert done.stats.finish_reason == "stop"


def test_stop_string_is_not_emitted(tiny_model_dir):
    model, tokenizer = load_model(tiny_model_dir), load_tokenizer(tiny_model_dir)
    free = run(model, tokenizer, [1, 9, 10], params=GREEDY, max_tokens=30).text
    assert len(free) > 6
    stop = free[3:6]
    done = run(model, tokenizer, [1, 9, 10], params=GREEDY, max_tokens=30, stop_strings=[stop])
    assert done.text == free[: free.index(stop)]
    assert done.stats.finish_reason == "stop"


def test_stop_event_interrupts(tiny_model_dir):
    model, tokenizer = load_model(tiny_model_dir), load_tokenizer(tiny_model_dir)
    stop = threading.Event()
    events = generate(
        model, tokenizer, [1, 2, 3], params=GREEDY, max_tokens=100, stop_event=stop, end_tokens=()
    )
    for i, event in enumerate(events):
        if i == 3:
            stop.set()
        if isinstance(event, Done):
            break
    assert event.stats.finish_reason == "interrupted"
    assert event.stats.generated_tokens == 4


def test_stats_and_cache_reuse(tiny_model_dir):
    model, tokenizer = load_model(tiny_model_dir), load_tokenizer(tiny_model_dir)
    cache = model.make_cache()
    prompt = list(range(50, 90))
    first = run(model, tokenizer, prompt, params=GREEDY, max_tokens=5, cache=cache)
    s = first.stats
    assert (s.prompt_tokens, s.cached_tokens, s.generated_tokens) == (40, 0, 5)
    assert s.ttft_s > 0 and s.prefill_tps > 0 and s.decode_tps > 0 and s.peak_memory_gb > 0
    # The cache holds prompt + the tokens fed back; continuing from it equals a fresh run.
    fed = (prompt + first.tokens)[: cache.offset]
    follow = fed + [60, 61]
    again = run(model, tokenizer, follow, params=GREEDY, max_tokens=5, cache=cache)
    assert again.stats.cached_tokens == len(fed)
    fresh = run(model, tokenizer, follow, params=GREEDY, max_tokens=5)
    assert again.tokens == fresh.tokens


def test_prompt_longer_than_context_is_refused(tiny_model_dir):
    model, tokenizer = load_model(tiny_model_dir), load_tokenizer(tiny_model_dir)
    with pytest.raises(UsageError, match="context"):
        list(generate(model, tokenizer, [1] * 600))


def test_stop_strings_hold_back_partial_matches():
    stops = StopStrings(["</end>"])
    assert stops.feed("hello </e") == ("hello ", False)
    assert stops.feed("x") == ("</ex", False)
    assert stops.feed("ok </en") == ("ok ", False)
    assert stops.feed("d> never") == ("", True)


def test_sampling_parameters_are_validated():
    for bad in ({"temperature": -1}, {"top_p": 0}, {"top_k": -2}, {"min_p": 1.5}):
        with pytest.raises(UsageError):
            SamplingParams(**bad)


def test_ctrl_c_in_the_consumer_winds_the_generator_down(tiny_model_dir):
    from apertus_mlx.generate import wind_down

    model, tokenizer = load_model(tiny_model_dir), load_tokenizer(tiny_model_dir)
    events = generate(model, tokenizer, [1, 200, 201], params=GREEDY, max_tokens=50, end_tokens=())
    first, second = next(events), next(events)
    assert isinstance(first, Chunk) and isinstance(second, Chunk)
    *rest, done = wind_down(events)  # as if KeyboardInterrupt hit between the two chunks
    assert isinstance(done, Done) and all(isinstance(e, Chunk) for e in rest)
    assert done.stats.finish_reason == "interrupted"
    assert done.tokens == [first.token, second.token]
    assert done.text == first.text + second.text + "".join(e.text for e in rest)


def test_an_answer_cut_mid_character_keeps_its_last_bytes(tiny_model_dir):
    """An answer that runs out of tokens inside a multi-byte character ends, like the decoded
    tokens, with a replacement character: the held-back bytes are not dropped."""
    model, tokenizer = load_model(tiny_model_dir), load_tokenizer(tiny_model_dir)
    params = SamplingParams(temperature=1.0, top_p=1.0, seed=4)
    tokens = run(model, tokenizer, [1, 200, 201], params=params, max_tokens=80).tokens
    # the first length at which the tokens end inside a character the next token completes
    cut = next(
        n
        for n in range(1, len(tokens))
        if tokenizer.decode(tokens[:n]).endswith("\ufffd")
        and not tokenizer.decode(tokens[: n + 1]).startswith(tokenizer.decode(tokens[:n]))
    )
    done = run(model, tokenizer, [1, 200, 201], params=params, max_tokens=cut)
    assert done.tokens == tokens[:cut]
    assert done.text == tokenizer.decode(done.tokens) and done.text.endswith("\ufffd")


def test_the_cache_is_reserved_once_for_the_prompt_and_the_answer_budget(
    tiny_model_dir, monkeypatch
):
    """A short exchange allocated a whole step of 256 positions (more memory than mlx-lm on a
    short benchmark row), and a long prompt grew its buffers, copying them, chunk by chunk."""
    import apertus_mlx.forward as chunking
    from apertus_mlx.cache import KVCache
    from apertus_mlx.generate import generate_step
    from apertus_mlx.sampling import make_sampler

    assert KVCache(2, 1, 32, mx.float32).capacity == 0
    short = KVCache(2, 1, 32, mx.float32)
    short.reserve(11, most=11)
    assert short.capacity == 64  # not the step's 256
    grown = KVCache(2, 1, 32, mx.float32)
    grown.reserve(11)
    grown.reserve(300, most=200)  # more than `most` asked for: at least what is needed
    assert grown.capacity == 320

    monkeypatch.setattr(chunking, "MAX_CHUNK", 16)  # a long prompt, in many chunks
    forward = Forward(load_model(tiny_model_dir))
    cache = forward.model.make_cache()
    sizes = []
    reserve = cache.reserve
    cache.reserve = lambda needed, most=None: (reserve(needed, most), sizes.append(cache.capacity))
    prompt = list(range(200, 500))
    steps = generate_step(prompt, forward, cache, sampler=make_sampler(SamplingParams()),
                          max_tokens=5)  # fmt: skip
    assert len(list(steps)) == 5
    assert set(sizes) == {320}  # 300 + 5, rounded: from the first chunk on, never regrown
