"""Apertus's format end to end: a scripted checkpoint says deliberation, tool calls (one,
parallel, malformed) at any temperature; `generate` streams it and the parser turns it into
events; the call's result goes back and the answer continues the same turn from the cache."""

from __future__ import annotations

import itertools

import pytest

from apertus_mlx import load
from apertus_mlx.format import (
    Chunk,
    FormatParser,
    FormatWarning,
    Thought,
    ThoughtEnd,
    ThoughtStart,
    ToolCall,
    assistant_message,
    end_tokens,
    openai_fields,
    parse_generation,
    thought_open,
)
from apertus_mlx.generate import Done, generate
from apertus_mlx.sampling import SamplingParams
from tests.checkpoints import SCRIPTS, TOOLS, reference_model

QUESTION = [{"role": "user", "content": "Weather in Bern?"}]


def run(path, messages, tools=None, temperature=1.5, seed=0, cache=None, thinking=False):
    """One turn: (format events, Done, prompt ids)."""
    model, tok = load(path)
    ids = tok.apply_chat_template(messages, tools=tools, enable_thinking=thinking)
    parser = FormatParser(tok, tools and [{"name": "get_weather"}], call_id=_ids())
    ends = end_tokens(tok, model.generation.eos_token_ids, tools_offered=bool(tools))
    params = SamplingParams(temperature=temperature, seed=seed)
    stream = generate(model, tok, ids, params=params, end_tokens=ends, cache=cache)
    events = list(parse_generation(stream, parser))
    assert isinstance(events[-1], Done)
    return events[:-1], events[-1], ids


def _ids():
    return (f"call_{n}" for n in itertools.count()).__next__


def test_it_is_an_apertus_checkpoint_that_transformers_runs_alike(scripted):
    """Checked once against the reference: transformers' greedy continuation is the script."""
    import torch

    path = scripted("deliberation")
    model, tok = load(path)
    ids = tok.apply_chat_template(QUESTION, enable_thinking=True)
    *_, done = generate(model, tok, ids, params=SamplingParams(temperature=0))
    reference = reference_model(path)
    with torch.no_grad():
        out = reference.generate(
            torch.tensor([ids]), max_new_tokens=8, do_sample=False, eos_token_id=[68]
        )
    assert done.tokens == out[0, len(ids) :].tolist()
    assert tok.decode(done.tokens) == "".join(SCRIPTS["deliberation"]["<|assistant_start|>"]) + (
        "<|assistant_end|>"
    )


@pytest.mark.parametrize("temperature, seed", [(0.0, 0), (0.8, 1), (2.0, 2)])
def test_deliberation_streams_as_thought_then_answer(scripted, temperature, seed):
    events, done, _ = run(
        scripted("deliberation"), QUESTION, None, temperature, seed, thinking=True
    )
    assert events == [
        ThoughtStart(),
        Thought("Let me think."),
        ThoughtEnd(),
        Chunk("Grüezi mitenand!"),
    ]
    assert done.stats.finish_reason == "stop"
    assert openai_fields(assistant_message(events)) == {
        "content": "Grüezi mitenand!",
        "reasoning_content": "Let me think.",
    }


def test_a_call_stops_the_turn_and_its_result_continues_it_from_the_cache(scripted):
    path = scripted("call")
    model, tok = load(path)
    cache = model.make_cache()
    events, done, first = run(path, QUESTION, TOOLS, cache=cache)
    assert events == [ToolCall("call_0", "get_weather", '{"city": "Bern"}', 0)]
    assert done.tokens[-1] == tok.token_to_id("<|tools_suffix|>")  # stopped right there
    assert done.stats.finish_reason == "stop"

    # The client sends the call back as OpenAI does (arguments as a string) with the result.
    fields = openai_fields(assistant_message(events))
    assert fields["tool_calls"][0]["function"] == {
        "name": "get_weather",
        "arguments": '{"city": "Bern"}',
    }
    messages = [
        *QUESTION,
        {"role": "assistant", "content": None, "tool_calls": fields["tool_calls"]},
        {"role": "tool", "tool_call_id": "call_0", "content": "21 C"},
    ]
    second = tok.apply_chat_template(messages, tools=TOOLS)
    # Token for token, the new prompt extends what the model read and wrote: the cache of the
    # first request serves it (the call tokens are the ones the model produced).
    assert second[: len(first) + len(done.tokens)] == first + done.tokens
    assert not thought_open(second, FormatParser(tok).control)
    held = cache.tokens  # the prompt and the answer (its last token too, if it was fed)
    assert held in (first + done.tokens[:-1], first + done.tokens)
    assert cache.keep_prefix(second) == len(held)
    events, done, _ = run(path, messages, TOOLS, cache=cache)
    assert events == [Chunk("It is 21 C in Bern.")]
    assert done.stats.cached_tokens == len(held)


def test_parallel_calls_become_several_calls_after_the_thought(scripted):
    events, done, _ = run(scripted("parallel"), QUESTION, TOOLS, thinking=True)
    assert events == [
        ThoughtStart(),
        Thought("Two cities, two calls."),
        ThoughtEnd(),
        ToolCall("call_0", "get_weather", '{"city": "Bern"}', 0),
        ToolCall("call_1", "get_weather", '{"city": "Chur"}', 0),
    ]
    message = assistant_message(events)
    assert [b["type"] for b in message["content"]["blocks"]] == [
        "thoughts",
        "response",
        "tool_calls",
    ]


def test_a_malformed_call_is_text_and_a_warning(scripted):
    events, done, _ = run(scripted("malformed"), QUESTION, TOOLS)
    assert events[0] == Chunk('<|tools_prefix|>[{"get_weather": {city: Bern}}]<|tools_suffix|>')
    assert isinstance(events[1], FormatWarning) and "not valid" in events[1].message
    assert len(events) == 2 and not any(isinstance(e, ToolCall) for e in events)
