"""The generation loop: greedy equals transformers, sampling is repeatable, stops are honoured."""

from __future__ import annotations

import threading

import mlx.core as mx
import numpy as np
import pytest
import torch

from apertus_mlx.config import GenerationConfig
from apertus_mlx.errors import UsageError
from apertus_mlx.generate import Chunk, DecodeStep, Done, generate
from apertus_mlx.loading import load_model
from apertus_mlx.sampling import SamplingParams
from apertus_mlx.stopping import StopStrings
from apertus_mlx.tokenizer import load_tokenizer
from tests.checkpoints import reference_model

GREEDY = SamplingParams(temperature=0)


def run(model, tokenizer, ids, **kwargs) -> Done:
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


def test_compiled_step_matches_plain_step(tiny_model_dir, vocab_size):
    model = load_model(tiny_model_dir)
    from apertus_mlx.fast_decode import CompiledDecodeStep

    ids = np.random.default_rng(3).integers(0, vocab_size, 20).tolist()
    outputs = []
    for step in (DecodeStep(model), CompiledDecodeStep(model)):
        cache = model.make_cache()
        cache.step = 16  # cross a buffer growth while decoding
        logits = [step.prefill(mx.array([ids[:5]]), cache)]
        for t in ids[5:]:
            logits.append(step(mx.array([t]), cache))
        outputs.append(np.array(mx.stack(logits)))
    np.testing.assert_allclose(outputs[0], outputs[1], rtol=1e-5, atol=1e-5)


def test_chunked_prefill_equals_one_pass(tiny_model_dir, monkeypatch):
    import apertus_mlx.generate as gen

    model, tokenizer = load_model(tiny_model_dir), load_tokenizer(tiny_model_dir)
    ids = list(range(100, 180))
    whole = run(model, tokenizer, ids, params=GREEDY, max_tokens=8).tokens
    monkeypatch.setattr(gen, "PREFILL_STEP", 16)
    assert run(model, tokenizer, ids, params=GREEDY, max_tokens=8).tokens == whole


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
    model.generation = GenerationConfig(eos_token_ids=(free[5],))
    done = run(model, tokenizer, [1, 5, 6], params=GREEDY, max_tokens=12)
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
    events = generate(model, tokenizer, [1, 2, 3], params=GREEDY, max_tokens=100, stop_event=stop)
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
    events = generate(model, tokenizer, [1, 200, 201], params=GREEDY, max_tokens=50)
    first, second = next(events), next(events)
    assert isinstance(first, Chunk) and isinstance(second, Chunk)
    *rest, done = wind_down(events)  # as if KeyboardInterrupt hit between the two chunks
    assert isinstance(done, Done) and all(isinstance(e, Chunk) for e in rest)
    assert done.stats.finish_reason == "interrupted"
    assert done.tokens == [first.token, second.token]
    assert done.text == first.text + second.text + "".join(e.text for e in rest)
