"""Constrained answers: whatever the weights and the budget, a JSON-schema answer parses and
validates, a forced tool call is a valid call, and what cannot be enforced is refused."""

from __future__ import annotations

import json

import jsonschema
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from apertus_mlx import load
from apertus_mlx.constrained import (
    Constraint,
    json_schema_grammar,
    schema_from_response_format,
    tool_call_grammar,
)
from apertus_mlx.errors import UsageError
from apertus_mlx.format import ControlIds, FormatParser, ToolCall, end_tokens, parse_generation
from apertus_mlx.format.stream import Chunk as AnswerChunk
from apertus_mlx.format.stream import Thought
from apertus_mlx.generate import Done, Forward, generate
from apertus_mlx.sampling import SamplingParams


@pytest.fixture(scope="module")
def loaded(tiny_model_dir):
    model, tok = load(tiny_model_dir)
    return model, tok, Forward(model)


def answer(loaded, grammar, max_tokens, params, messages=None, ends=None):
    model, tok, forward = loaded
    constraint = Constraint.build(grammar, model, tok, end_tokens=ends)
    processor = constraint.processor(max_tokens)
    ids = tok.apply_chat_template(messages or [{"role": "user", "content": "JSON, please."}])
    *_, done = generate(
        model,
        tok,
        ids,
        params=params,
        max_tokens=max_tokens,
        forward=forward,
        logits_processors=[processor],
        end_tokens=ends,
    )
    assert isinstance(done, Done)
    return done, processor


names = st.text(alphabet="abcdefgh_", min_size=1, max_size=6)
scalars = st.one_of(
    st.just({"type": "string"}),
    st.integers(0, 3).map(lambda n: {"type": "string", "minLength": n, "maxLength": n + 4}),
    st.just({"type": "integer"}),
    st.tuples(st.integers(-50, 50), st.integers(0, 100)).map(
        lambda t: {"type": "integer", "minimum": t[0], "maximum": t[0] + t[1]}
    ),
    st.just({"type": "number"}),
    st.just({"type": "boolean"}),
    st.just({"type": "null"}),
    st.lists(st.text(max_size=4) | st.integers(-999, 999), min_size=1, max_size=3, unique=True).map(
        lambda v: {"enum": v}
    ),
    st.sampled_from([{"type": "string", "pattern": "^[a-z]{2,5}$"}, {"const": "fixed"}]),
)


def containers(children):
    def obj(props_required_extra):
        props, required, extra = props_required_extra
        out = {"type": "object", "properties": props, "additionalProperties": extra}
        if props:
            out["required"] = [k for k in props if k in required]
        return out

    return st.one_of(
        st.tuples(children, st.integers(0, 2), st.booleans()).map(
            lambda t: (
                {"type": "array", "items": t[0], "minItems": t[1]}
                | ({"maxItems": t[1] + 2} if t[2] else {})
            )
        ),
        st.tuples(
            st.dictionaries(names, children, max_size=4),
            st.sets(names, max_size=4),
            st.booleans(),
        ).map(obj),
        st.lists(children, min_size=2, max_size=3).map(lambda s: {"anyOf": s}),
    )


schemas = st.recursive(scalars, containers, max_leaves=8)


@settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    schema=schemas,
    max_tokens=st.integers(48, 160),
    temperature=st.sampled_from([0.0, 0.8, 1.5]),
    seed=st.integers(0, 2**32 - 1),
)
def test_any_schema_any_weights_the_answer_validates(loaded, schema, max_tokens, temperature, seed):
    _, tok, _ = loaded
    grammar = json_schema_grammar(schema, ControlIds.from_tokenizer(tok))
    params = SamplingParams(temperature=temperature, seed=seed)
    done, processor = answer(loaded, grammar, max_tokens, params)
    jsonschema.validate(json.loads(done.text), schema)
    assert done.tokens[-1] in (2, 68)  # it ended with an end token, within the budget
    assert len(done.tokens) <= max_tokens


def test_a_tight_budget_closes_the_answer_early(loaded):
    schema = {
        "type": "object",
        "properties": {"story": {"type": "string"}, "n": {"type": "integer"}},
        "required": ["story", "n"],
    }
    grammar = json_schema_grammar(schema, ControlIds.from_tokenizer(loaded[1]))
    done, processor = answer(loaded, grammar, 24, SamplingParams(temperature=1.5, seed=3))
    jsonschema.validate(json.loads(done.text), schema)
    assert len(done.tokens) <= 24


def test_a_budget_below_the_shortest_answer_is_a_usage_error(loaded):
    schema = {"type": "array", "items": {"const": "abcdefghijklmnop"}, "minItems": 20}
    grammar = json_schema_grammar(schema, ControlIds.from_tokenizer(loaded[1]))
    with pytest.raises(UsageError, match="shortest answer .* raise max tokens"):
        answer(loaded, grammar, 10, SamplingParams(temperature=0))


@pytest.mark.parametrize(
    "schema, message",
    [
        ({"type": "object", "not": {"type": "string"}}, "not"),
        ({"type": "string", "pattern": "(?=a)b"}, "look-around"),
        ({"type": "string", "format": "weird"}, "weird"),
        ({"$ref": "https://example.com/schema.json"}, "not present in a registry"),
        ("not a schema", "JSON object"),
    ],
)
def test_what_cannot_be_enforced_is_a_one_line_usage_error(loaded, schema, message):
    with pytest.raises(UsageError, match=message) as e:
        json_schema_grammar(schema, ControlIds.from_tokenizer(loaded[1]))
    assert "\n" not in str(e.value)


def test_response_format_shapes():
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}}
    assert schema_from_response_format(None) is None
    assert schema_from_response_format({"type": "text"}) is None
    assert schema_from_response_format({"type": "json_object"}) == {"type": "object"}
    wrapped = {"type": "json_schema", "json_schema": {"name": "x", "schema": schema}}
    assert schema_from_response_format(wrapped) == schema
    with pytest.raises(UsageError, match="unsupported response_format"):
        schema_from_response_format({"type": "yaml"})
    with pytest.raises(UsageError, match="needs a 'schema'"):
        schema_from_response_format({"type": "json_schema", "json_schema": {"name": "x"}})


WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}, "days": {"type": "integer"}},
            "required": ["city"],
        },
    },
}
CLOCK = {"type": "function", "function": {"name": "now", "parameters": {"type": "object"}}}


@pytest.mark.parametrize("name", [None, "now", "get_weather"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_a_forced_call_is_a_valid_call(loaded, name, seed):
    model, tok, _ = loaded
    control = ControlIds.from_tokenizer(tok)
    ends = end_tokens(tok, model.generation.eos_token_ids, tools_offered=True)
    grammar = tool_call_grammar([WEATHER, CLOCK], control, name=name)
    params = SamplingParams(temperature=1.0, seed=seed)
    messages = [{"role": "user", "content": "Weather?"}]
    done, _ = answer(loaded, grammar, 80, params, messages, ends)
    assert done.tokens[0] == control.tools_prefix and done.tokens[-1] == control.tools_suffix
    parser = FormatParser(tok, [{"name": "get_weather"}, {"name": "now"}])
    events = [e for token in done.tokens for e in parser.feed(token, tok.decode([token]))]
    calls = [e for e in events if isinstance(e, ToolCall)]
    assert calls and len(calls) == len(events)
    assert name is None or [c.name for c in calls] == [name]
    params_of = {"get_weather": WEATHER, "now": CLOCK}
    for c in calls:
        jsonschema.validate(c.parsed, params_of[c.name]["function"]["parameters"])


def test_deliberation_may_come_before_a_constrained_answer(loaded):
    model, tok, _ = loaded
    control = ControlIds.from_tokenizer(tok)
    schema = {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"]}
    grammar = json_schema_grammar(schema, control, thinking=True)
    for seed in range(4):
        done, _ = answer(loaded, grammar, 64, SamplingParams(temperature=1.0, seed=seed))
        parser = FormatParser(tok, [])
        text = "".join(
            e.text
            for e in parse_generation([*_chunks(tok, done.tokens[:-1]), done], parser)
            if isinstance(e, AnswerChunk)
        )
        assert json.loads(text)["ok"] in (True, False)
        thought = [t for t in done.tokens if t in (control.inner_prefix, control.inner_suffix)]
        assert thought in ([], [control.inner_prefix, control.inner_suffix])
    assert Thought  # the events type used by callers


def _chunks(tok, tokens):
    from apertus_mlx.generate import Chunk

    return [Chunk(tok.decode([t]), t) for t in tokens]


def test_tool_choice_errors(loaded):
    control = ControlIds.from_tokenizer(loaded[1])
    with pytest.raises(UsageError, match="not among the tools"):
        tool_call_grammar([WEATHER], control, name="nope")
    with pytest.raises(UsageError, match="no tools are offered"):
        tool_call_grammar([], control)


def test_no_constraint_with_a_draft_model(loaded):
    model, tok, forward = loaded
    from apertus_mlx.speculative import Draft

    with pytest.raises(UsageError, match="draft"):
        next(
            generate(
                model,
                tok,
                [1, 2, 3],
                draft=object.__new__(Draft),
                logits_processors=[lambda t, x: x],
            )
        )
