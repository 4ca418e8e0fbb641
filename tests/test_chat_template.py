"""Prompt ids equal transformers', no double BOS, user text never becomes control tokens."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from apertus_mlx.errors import TokenizerError
from apertus_mlx.tokenizer import load_tokenizer

WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Get the current weather",
        "parameters": {
            "type": "object",
            "properties": {
                "location": {"type": "string", "description": "City name"},
                "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
                "days": {"type": "array", "items": {"type": "integer"}},
                "verbose": {"type": "boolean", "nullable": True},
            },
            "required": ["location"],
        },
    },
}
CLOCK_TOOL = {"type": "function", "function": {"name": "now", "description": "Current time"}}

CONVERSATIONS = {
    "user-only": ([{"role": "user", "content": "Hello!"}], {}),
    "system": (
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}],
        {},
    ),
    "multi-turn": (
        [
            {"role": "user", "content": "What is 2+2?"},
            {"role": "assistant", "content": "4."},
            {"role": "user", "content": "And 3+3?"},
        ],
        {},
    ),
    "thinking": ([{"role": "user", "content": "Think first."}], {"enable_thinking": True}),
    "unicode": (
        [
            {"role": "system", "content": "Réponds en français. 你好 🇨🇭"},
            {"role": "user", "content": "Grüezi! Chuchichäschtli? こんにちは مرحبا नमस्ते"},
        ],
        {},
    ),
    "tools": (
        [
            {"role": "user", "content": "Weather in Bern?"},
            {
                "role": "assistant",
                "content": "",
                "tool_calls": [
                    {
                        "type": "function",
                        "function": {"name": "get_weather", "arguments": {"location": "Bern"}},
                    }
                ],
            },
            {"role": "tool", "content": '{"temp": 21}'},
            {"role": "tool", "content": "sunny"},
            {"role": "assistant", "content": "21 degrees and sunny."},
            {"role": "user", "content": "Thanks"},
        ],
        {"tools": [WEATHER_TOOL, CLOCK_TOOL]},
    ),
    "blocks": (
        [
            {"role": "user", "content": {"parts": [{"type": "text", "text": "Plan a trip"}]}},
            {
                "role": "assistant",
                "content": {
                    "blocks": [
                        {"type": "thoughts", "text": "Need the weather."},
                        {
                            "type": "tool_calls",
                            "calls": [{"name": "get_weather", "arguments": '{"location": "Chur"}'}],
                        },
                        {"type": "tool_outputs", "outputs": [{"output": "rain"}]},
                        {"type": "response", "text": "Take an umbrella."},
                    ]
                },
            },
            {"role": "user", "content": "ok"},
        ],
        {"enable_thinking": True},
    ),
}


# The published template reads tools flat (name, description, parameters), not OpenAI's
# {"type": "function", "function": {...}}, which our own template also accepts.
FLAT_WEATHER_TOOL = {
    "name": "get_weather",
    "description": "Get the weather",
    "parameters": {
        "type": "object",
        "properties": {
            "location": {"type": "string", "description": "City"},
            "unit": {"type": "string", "enum": ["c", "f"], "default": "c"},
            "days": {"type": "array", "items": {"type": "integer"}},
            "tags": {"type": "array", "items": {"type": "string"}, "nullable": True},
            "verbose": {"type": "boolean", "nullable": True},
            "note": {"type": "string", "nullable": True},
            "limit": {"type": "number", "default": 3},
            "when": {"type": ["string", "null"]},
            "grid": {"type": "array", "items": {"type": "array", "items": {"type": "number"}}},
        },
        "required": ["location", "days"],
    },
}
FLAT_CLOCK_TOOL = CLOCK_TOOL["function"]

PUBLISHED_CONVERSATIONS = {
    **{name: c for name, c in CONVERSATIONS.items() if name != "tools"},
    "tools": (CONVERSATIONS["tools"][0], {"tools": [FLAT_WEATHER_TOOL, FLAT_CLOCK_TOOL]}),
    "openai-tool-calls": (
        [
            {"role": "user", "content": "Zürich?"},
            {
                "role": "assistant",
                "tool_calls": [
                    {
                        "type": "function",
                        "function": {
                            "name": "get_weather",
                            "arguments": {"location": "Zürich", "note": "<5 °C & 'rain'>"},
                        },
                    },
                    {"type": "function", "function": {"name": "now", "arguments": {}}},
                ],
            },
            {"role": "tool", "content": "rain"},
            {"role": "tool", "content": "12:00"},
            {"role": "assistant", "content": "Rain at noon."},
        ],
        {"tools": [FLAT_CLOCK_TOOL]},
    ),
    "deliberation-and-calls": (
        [
            {"role": "system", "content": {"text": "Think, then answer."}},
            {"role": "user", "content": "q"},
            {
                "role": "assistant",
                "content": {
                    "blocks": [
                        {"type": "thoughts", "text": "first "},
                        {"type": "thoughts", "text": "second"},
                        {"type": "tool_calls", "calls": [{"name": "display_answers",
                                                          "arguments": "{}"}]},
                        {"type": "response", "text": "r"},
                    ]
                },
            },
            {"role": "tool", "content": "out"},
            {
                "role": "assistant",
                "content": {
                    "blocks": [
                        {"type": "thoughts", "text": "more"},
                        {"type": "tool_calls", "calls": [{"name": "a", "arguments": "{}"},
                                                         {"name": "b", "arguments": "{\"n\": 1}"}]},
                        {"type": "tool_outputs", "outputs": [{"output": "1"}, {"output": "2"}]},
                        {"type": "response", "text": "x"},
                    ]
                },
            },
        ],
        {"enable_thinking": True},
    ),
}  # fmt: skip


@pytest.fixture(scope="module")
def published(tokenizer_dir, tmp_path_factory):
    """(ours, transformers'): the fixture tokenizer with a stand-in for the template published
    with Apertus-8B-Instruct-2509 (tests/fixtures), loaded by us and by transformers."""
    transformers = pytest.importorskip("transformers")
    d = tmp_path_factory.mktemp("published") / "tok"
    shutil.copytree(tokenizer_dir, d)
    source = Path(__file__).parent / "fixtures" / "apertus-2509-chat-template.jinja"
    shutil.copy(source, d / "chat_template.jinja")
    return load_tokenizer(d), transformers.AutoTokenizer.from_pretrained(d)


@pytest.fixture(scope="module")
def tok(tokenizer_dir):
    return load_tokenizer(tokenizer_dir)


@pytest.fixture(scope="module")
def builtin_tok(tokenizer_dir, tmp_path_factory):
    d = tmp_path_factory.mktemp("no-template") / "tok"
    shutil.copytree(tokenizer_dir, d)
    (d / "chat_template.jinja").unlink()
    return load_tokenizer(d)


@pytest.fixture(scope="module")
def special_strings(tok):
    added = json.loads(tok._tok.to_str())["added_tokens"]
    return {t["content"]: t["id"] for t in added if t["special"]}


def _hf_ids(hf, messages, **kwargs):
    out = hf.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, **kwargs)
    return list(out["input_ids"] if hasattr(out, "keys") else out)  # transformers 5: BatchEncoding


@pytest.mark.parametrize("name", PUBLISHED_CONVERSATIONS)
def test_ids_equal_transformers(published, name):
    """Our renderer and tokenization against transformers' `apply_chat_template`, on the
    published template's dialect (not on our own template)."""
    tok, hf = published
    messages, kwargs = PUBLISHED_CONVERSATIONS[name]
    assert tok.apply_chat_template(messages, **kwargs) == _hf_ids(hf, messages, **kwargs)
    text = hf.apply_chat_template(messages, add_generation_prompt=True, tokenize=False, **kwargs)
    assert tok.render_chat(messages, **kwargs) == text
    no_prompt = dict(kwargs, add_generation_prompt=False)
    assert tok.render_chat(messages, **no_prompt) == hf.apply_chat_template(
        messages, tokenize=False, **no_prompt
    )


@pytest.mark.parametrize("name", PUBLISHED_CONVERSATIONS)
def test_our_template_renders_like_the_published_one(builtin_tok, published, name):
    """For a checkpoint that ships no template, ours stands in: the same prompt text."""
    messages, kwargs = PUBLISHED_CONVERSATIONS[name]
    want = published[1].apply_chat_template(
        messages, add_generation_prompt=True, tokenize=False, **kwargs
    )
    assert builtin_tok.render_chat(messages, **kwargs) == want


def test_documented_layout(tok):
    messages = [{"role": "system", "content": "S"}, {"role": "user", "content": "U"}]
    assert tok.render_chat(messages) == (
        "<s><|system_start|>S<|system_end|><|developer_start|>Deliberation: disabled\n"
        "Tool Capabilities: disabled<|developer_end|><|user_start|>U<|user_end|><|assistant_start|>"
    )
    assert not tok.render_chat(messages, add_generation_prompt=False).endswith("_start|>")
    default = tok.render_chat(messages[1:], enable_thinking=True)
    assert "You are Apertus, a helpful assistant created by the SwissAI initiative." in default
    assert "Current date: 20" in default and "Deliberation: enabled" in default


def test_tool_declarations_render_as_typescript(tok):
    text = tok.render_chat([{"role": "user", "content": "x"}], tools=[WEATHER_TOOL, CLOCK_TOOL])
    assert (
        "Tool Capabilities:\n// Get the current weather\ntype get_weather = (_: {\n"
        '// City name\nlocation: string,\nunit?: "celsius" | "fahrenheit",\n'
        "days?: number[],\nverbose?: boolean\n}) => any;\n"
        "// Current time\ntype now = () => any;<|developer_end|>"
    ) in text


def test_no_double_bos(tok):
    for messages, kwargs in CONVERSATIONS.values():
        ids = tok.apply_chat_template(messages, **kwargs)
        assert ids[0] == 1 and ids.count(1) == 1


def test_user_text_never_becomes_control_tokens(tok, special_strings):
    evil = "".join(f"a{s} " for s in special_strings)
    clean = [
        {"role": "system", "content": "sys"},
        {"role": "user", "content": "u"},
        {"role": "assistant", "content": "a", "reasoning_content": "r"},
        {"role": "user", "content": "u2"},
    ]
    dirty = [{**m, **{k: evil for k in m if k != "role"}} for m in clean]
    control = set(special_strings.values())
    clean_ids = tok.apply_chat_template(clean)
    dirty_ids = tok.apply_chat_template(dirty)
    assert [i for i in dirty_ids if i in control] == [i for i in clean_ids if i in control]
    assert tok.decode(dirty_ids) == tok.render_chat(dirty)
    user_turn = tok.apply_chat_template([{"role": "user", "content": evil}])
    start = user_turn.index(65)
    assert user_turn[start + 1 : -2] == tok.encode(evil)
    assert user_turn[-2:] == [66, 67]


@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(data=st.data())
def test_any_user_text_is_encoded_as_text(tok, special_strings, data):
    pieces = st.one_of(st.text(max_size=12), st.sampled_from(sorted(special_strings)))
    text = "".join(data.draw(st.lists(pieces, max_size=6)))
    ids = tok.apply_chat_template(
        [{"role": "system", "content": "s"}, {"role": "user", "content": text}]
    )
    prefix = tok.apply_chat_template(
        [{"role": "system", "content": "s"}, {"role": "user", "content": ""}]
    )
    assert ids[: len(prefix) - 2] == prefix[:-2]
    assert ids[len(prefix) - 2 :] == [*tok.encode(text), 66, 67]


def test_builtin_template_when_checkpoint_has_none(tok, builtin_tok):
    assert not builtin_tok.has_chat_template
    for messages, kwargs in CONVERSATIONS.values():
        assert builtin_tok.render_chat(messages, **kwargs) == tok.render_chat(messages, **kwargs)
        assert builtin_tok.apply_chat_template(messages, **kwargs) == tok.apply_chat_template(
            messages, **kwargs
        )


def test_second_system_message_raises(tok):
    messages = [
        {"role": "system", "content": "a"},
        {"role": "user", "content": "b"},
        {"role": "system", "content": "c"},
    ]
    with pytest.raises(TokenizerError, match="system"):
        tok.apply_chat_template(messages)


def test_raising_template_gives_tokenizer_error(tokenizer_dir, tmp_path):
    d = tmp_path / "d"
    shutil.copytree(tokenizer_dir, d)
    (d / "chat_template.jinja").write_text("{{ raise_exception('no chat for you') }}")
    with pytest.raises(TokenizerError, match="no chat for you"):
        load_tokenizer(d).render_chat([{"role": "user", "content": "x"}])


REWRITING_TEMPLATES = {
    "trim": "{{ m.content | trim }}",
    "upper": "{{ m.content | upper }}",
    "replace": "{{ m.content | replace('a', 'b') }}",
    "title": "{{ m.content | title }}",
    "reverse": "{{ m.content | reverse | join('') }}",
    "slice": "{{ m.content[1:] }}",
    "concat": "{{ m.content ~ m.content }}",
}


@pytest.fixture(scope="module")
def rewriting(tokenizer_dir, tmp_path_factory):
    """name -> a tokenizer whose template does `expression` to every message's text."""
    out = {}
    for name, expression in REWRITING_TEMPLATES.items():
        d = tmp_path_factory.mktemp(name)
        shutil.copytree(tokenizer_dir, d, dirs_exist_ok=True)
        source = (
            "{{ bos_token }}{% for m in messages %}<|user_start|>" + expression + "<|user_end|>"
            "{% endfor %}<|assistant_start|>"
        )
        (d / "chat_template.jinja").write_text(source)
        out[name] = load_tokenizer(d)
    return out


def test_template_that_rewrites_text_keeps_its_ids(rewriting):
    tok = rewriting["trim"]
    ids = tok.apply_chat_template([{"role": "user", "content": "  padded  "}])
    assert ids == [1, 65, *tok.encode("padded"), 66, 67]


@settings(
    max_examples=80, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(data=st.data())
def test_no_template_turns_user_text_into_control_tokens(rewriting, special_strings, data):
    """Whatever the template does to the text, control ids are exactly the template's own,
    and the ids still decode to the rendering (the text is all there, as text)."""
    name = data.draw(st.sampled_from(sorted(rewriting)))
    tok = rewriting[name]
    pieces = st.one_of(
        st.text(alphabet="ab <|>_/stuen", max_size=8), st.sampled_from(sorted(special_strings))
    )
    texts = data.draw(st.lists(st.text().map(str) | pieces, min_size=1, max_size=3))
    texts = ["".join(data.draw(st.lists(pieces, max_size=5))) + t for t in texts]
    messages = [{"role": "user", "content": t} for t in texts]
    ids = tok.apply_chat_template(messages)
    control = set(special_strings.values())
    assert [i for i in ids if i in control] == [1] + [65, 66] * len(texts) + [67]
    if name != "title":  # Jinja's title starts a word after "<", which user text hides
        assert tok.decode(ids) == tok.render_chat(messages)


def test_reversed_control_string_stays_text(rewriting):
    tok = rewriting["reverse"]
    ids = tok.apply_chat_template([{"role": "user", "content": ">|dne_metsys|<"}])
    assert ids.count(65) == 1 and 62 not in ids  # "<|system_end|>" built by reversing


@pytest.mark.parametrize(
    "source, message",
    [
        ("{{ 7 ** (7 ** 12) }}", "too large"),
        ("{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}",
         "loop iterations"),
        ("{{ 'a' * 10**10 }}", "limit"),
        ("{{ [1] * 10**9 }}", "limit"),
        ("{% set ns = namespace(s='ab') %}{% for i in range(64) %}{% set ns.s = ns.s ~ ns.s %}"
         "{% endfor %}", "limit"),
        ("{% set ns = namespace(s='ab') %}{% for i in range(64) %}{% set ns.s = ns.s + ns.s %}"
         "{% endfor %}", "limit"),
        ("{{ 'a' | center(10**10) }}", "limit"),
        ("{{ 'a'.ljust(10**10) }}", "limit"),
        ("{{ '%999999999d' % 1 }}", "limit"),
        ("{{ '{:>999999999}'.format(1) }}", "limit"),
        ("{% macro f() %}{{ f() }}{% endmacro %}{{ f() }}", "recursed"),
        ("{{ 1 / 0 }}", "ZeroDivisionError"),
        ("{{ ''.__class__.__mro__ }}", "unsafe"),
    ],
)  # fmt: skip
def test_hostile_template_fails_fast_with_one_line(tokenizer_dir, tmp_path, source, message):
    import time

    d = tmp_path / "d"
    shutil.copytree(tokenizer_dir, d)
    (d / "chat_template.jinja").write_text(source)
    start = time.monotonic()
    with pytest.raises(TokenizerError, match=message) as e:
        load_tokenizer(d).apply_chat_template([{"role": "user", "content": "x"}])
    assert time.monotonic() - start < 10
    assert "\n" not in str(e.value)


def test_render_time_is_bounded(tokenizer_dir, tmp_path, monkeypatch):
    import apertus_mlx.chat_template as ct

    monkeypatch.setattr(ct, "RENDER_SECONDS", 0.2)
    d = tmp_path / "d"
    shutil.copytree(tokenizer_dir, d)
    (d / "chat_template.jinja").write_text(
        "{% for i in range(99999) %}{% for c in 'abcdefghij' %}{{ c | upper }}{% endfor %}"
        "{% endfor %}"
    )
    with pytest.raises(TokenizerError, match="took more than 0.2 s"):
        load_tokenizer(d).render_chat([{"role": "user", "content": "x"}])
