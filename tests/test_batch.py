"""Continuous batching (`apertus_mlx.batch`): answers decoded together are the answers decoded
one at a time, whatever their prompts' lengths, samplers and moments of joining."""

from __future__ import annotations

import mlx.core as mx
import pytest

from apertus_mlx import load
from apertus_mlx.batch import BatchDecoder
from apertus_mlx.generate import Done
from apertus_mlx.settings import TurnSettings
from apertus_mlx.turn import TurnRequest, TurnService


@pytest.fixture(scope="module")
def service(tiny_model_dir):
    model, tokenizer = load(tiny_model_dir)
    return TurnService(model, tokenizer, model_id="tiny")


def request(i: int, **settings) -> TurnRequest:
    messages = [{"role": "user", "content": f"Frage {i}: " + "warum? " * (5 * i)}]
    settings = TurnSettings(**{"temperature": 0, "max_tokens": 24, **settings})
    return TurnRequest.chat(messages, settings, drop_oldest=False)


def alone(service, requests) -> list[Done]:
    service.caches.clear()
    return [next(e for e in service.start(r).events if isinstance(e, Done)) for r in requests]


def together(service, requests, join_at=None, capacities=None) -> tuple[list[Done], int]:
    """Every request in one batch (request i joins after `join_at[i]` steps); (Done of each,
    batched steps taken). `capacities` (a set) collects the rows' cache sizes per step."""
    service.caches.clear()
    decoder = BatchDecoder(service.forward)
    join_at = join_at or [0] * len(requests)
    live, done, steps = {}, {}, 0
    while len(done) < len(requests):
        for i, r in enumerate(requests):
            if join_at[i] == steps:
                live[i] = service.start(r, steps=decoder.steps).events
        for i, events in list(live.items()):
            for event in events:
                if getattr(event, "pending", False):
                    break
                if isinstance(event, Done):
                    done[i] = event
            else:
                del live[i]
        if capacities is not None:
            capacities.add(tuple(row.cache.capacity for row in decoder.rows))
        if decoder.step():
            steps += 1
        elif not live:
            steps += 1  # nobody running: the next ones join
    return [done[i] for i in range(len(requests))], steps


def test_greedy_answers_decoded_together_equal_those_alone(service):
    requests = [request(i) for i in range(4)]
    batched, steps = together(service, requests)
    expected = alone(service, requests)
    assert [d.tokens for d in batched] == [d.tokens for d in expected]
    assert [d.text for d in batched] == [d.text for d in expected]
    # one step per token of the longest answer: the rows decoded together
    assert steps < sum(len(d.tokens) for d in expected)


def test_rows_of_different_cache_sizes_decode_together_as_alone(service):
    """Rows attend together by cache size: mixed sizes, interleaved, change no answer."""
    settings = TurnSettings(temperature=0, max_tokens=24)
    requests = [
        TurnRequest.chat(
            [{"role": "user", "content": f"Frage {i}: " + "warum? " * n}],
            settings,
            drop_oldest=False,
        )
        for i, n in enumerate((3, 60, 5, 80, 8))
    ]
    capacities: set = set()
    batched, _ = together(service, requests, join_at=[4, 0, 4, 8, 8], capacities=capacities)
    assert (512, 256, 256, 256, 512) in capacities  # two sizes, interleaved
    assert [d.tokens for d in batched] == [d.tokens for d in alone(service, requests)]


def test_each_row_keeps_its_own_sampler_seed_and_stops(service):
    requests = [
        request(0, temperature=1.0, seed=7),
        request(1, temperature=0.7, top_k=20, seed=8),
        request(2),
        request(3, temperature=1.2, seed=9, max_tokens=9),
    ]
    expected = alone(service, requests)
    stop = expected[2].text[4:6]
    requests[2] = request(2, stop=(stop,))
    expected[2] = alone(service, [requests[2]])[0]
    batched, _ = together(service, requests)
    assert [d.tokens for d in batched] == [d.tokens for d in expected]
    assert batched[2].text == expected[2].text and stop not in batched[2].text


def test_answers_join_and_leave_at_any_step(service):
    requests = [request(i, max_tokens=8 + 5 * i) for i in range(4)]
    batched, _ = together(service, requests, join_at=[0, 3, 3, 11])
    assert [d.tokens for d in batched] == [d.tokens for d in alone(service, requests)]


def test_a_prefix_shared_with_another_conversation_is_read_from_a_copy(service):
    """A server's conversations share the template's opening: a new one reads it from
    another's cache without cutting that cache short or changing it."""
    import numpy as np

    from apertus_mlx.prompt_caches import PromptCaches

    forward, model = service.forward, service.model
    first = list(range(300, 340))
    cache = model.make_cache()
    forward.prefill(first, cache)
    before = [np.array(a) for a in cache.arrays()]
    pool = PromptCaches(min_share=0.5)
    pool.put(cache)
    other = first[:12] + list(range(500, 540))
    copy = pool.take(other, model.make_cache())
    assert copy is not cache and copy.offset == 12 and len(pool) == 1
    forward.prefill(other[12:], copy)
    assert copy.tokens == other and cache.tokens == first and cache.offset == len(first)
    assert all(np.array_equal(a, b) for a, b in zip(before, cache.arrays()))
    # the copy reads as a fresh cache would
    fresh = model.make_cache()
    logits = forward.prefill(other, fresh)
    again = forward(mx.array([[other[-1]]]), copy.copy_prefix(other))
    assert np.allclose(np.array(logits), np.array(again[:, -1, :]), atol=1e-4)


def test_a_long_prompt_joins_chunk_by_chunk_while_the_others_decode(service, monkeypatch):
    import apertus_mlx.batch as batch

    monkeypatch.setattr(batch, "PREFILL_CHUNK", 16)
    settings = TurnSettings(temperature=0, max_tokens=200)
    short = TurnRequest.chat([{"role": "user", "content": "Hoi"}], settings, drop_oldest=False)
    long = TurnRequest.chat(
        [{"role": "user", "content": "Berg " * 60}], settings, drop_oldest=False
    )
    service.caches.clear()
    decoder = BatchDecoder(service.forward)

    def advance(events) -> None:
        for event in events:
            if getattr(event, "pending", False):
                return

    first = service.start(short, steps=decoder.steps).events
    advance(first)
    decoder.step()
    second = service.start(long, steps=decoder.steps).events
    steps_while_reading = 0
    while True:
        advance(second)  # one chunk of its prompt, or the rest and its first token
        if len(decoder.rows) == 2:
            break
        advance(first)
        steps_while_reading += decoder.step()
    assert steps_while_reading >= 4  # the short answer went on between the long one's chunks
    first.close()
    second.close()
    assert not decoder.rows
