"""The server with Apertus's own format: tool calls and deliberation through the openai and
anthropic clients, on the scripted checkpoints (they say a call or a thought at any
temperature)."""

from __future__ import annotations

import json

import pytest

from tests.checkpoints import TOOLS
from tests.servers import Served

openai = pytest.importorskip("openai")
anthropic = pytest.importorskip("anthropic")

KEY = "sesam-oeffne-dich"
FLAT = [
    {
        "name": "get_weather",
        "description": "Weather now",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
    }
]
QUESTION = [{"role": "user", "content": "Weather in Bern?"}]


@pytest.fixture(scope="module")
def calling(scripted):
    server = Served(scripted("call"), "--api-key", KEY)
    yield server, openai.OpenAI(base_url=server.base, api_key=KEY, max_retries=0)
    server.stop()


@pytest.fixture(scope="module")
def thinking(scripted):
    server = Served(scripted("deliberation"))
    yield server, openai.OpenAI(base_url=server.base, api_key="unused", max_retries=0)
    server.stop()


def ask(client, messages=QUESTION, **kw):
    return client.chat.completions.create(model="", messages=messages, max_tokens=40, **kw)


@pytest.mark.parametrize("tools", [TOOLS, FLAT], ids=["nested", "flat"])
def test_tool_calls_not_streamed(calling, tools):
    _, client = calling
    out = ask(client, tools=tools, temperature=1.0)
    choice = out.choices[0]
    assert choice.finish_reason == "tool_calls"
    (call,) = choice.message.tool_calls
    assert call.type == "function" and call.function.name == "get_weather"
    assert json.loads(call.function.arguments) == {"city": "Bern"}
    assert call.id


def test_tool_calls_streamed_then_the_result_reuses_the_cache(calling):
    _, client = calling
    chunks = list(ask(client, tools=TOOLS, stream=True, stream_options={"include_usage": True}))
    deltas = [d for c in chunks if c.choices for d in c.choices[0].delta.tool_calls or ()]
    assert [(d.index, d.type, d.function.name) for d in deltas] == [(0, "function", "get_weather")]
    assert json.loads(deltas[0].function.arguments) == {"city": "Bern"}
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "tool_calls"
    first = chunks[-1].usage
    call = {
        "id": deltas[0].id,
        "type": "function",
        "function": {"name": "get_weather", "arguments": deltas[0].function.arguments},
    }
    follow = [
        *QUESTION,
        {"role": "assistant", "content": None, "tool_calls": [call]},
        {"role": "tool", "tool_call_id": deltas[0].id, "content": "21 C"},
    ]
    out = ask(client, follow, tools=TOOLS)
    assert out.choices[0].message.content == "It is 21 C in Bern."
    assert out.choices[0].finish_reason == "stop"
    # the call's tokens are read as the model wrote them: all of the first turn is reused
    # (but its last token when the model never read it)
    before = first.prompt_tokens + first.completion_tokens
    assert out.usage.prompt_tokens_details.cached_tokens in (before - 1, before)


def test_tool_choice_none_and_named(calling):
    _, client = calling
    named = ask(
        client, tools=TOOLS, tool_choice={"type": "function", "function": {"name": "get_weather"}}
    )
    assert named.choices[0].message.tool_calls[0].function.name == "get_weather"
    with pytest.raises(openai.BadRequestError, match="not among the tools"):
        ask(client, tools=TOOLS, tool_choice={"type": "function", "function": {"name": "nope"}})


def test_a_wrong_or_missing_key_is_401(calling):
    server, _ = calling
    import httpx2

    # no --cors-origin: no CORS headers; /health needs no key
    health = httpx2.get(server.url + "/health", headers={"Origin": "http://example.org"})
    assert health.status_code == 200 and "access-control-allow-origin" not in health.headers
    for key in ("wrong", ""):
        bad = openai.OpenAI(
            base_url=server.base,
            api_key=key or "x",
            max_retries=0,
            default_headers={} if key else {"Authorization": ""},
        )
        with pytest.raises(openai.AuthenticationError):
            ask(bad)
    a = anthropic.Anthropic(base_url=server.url, api_key="wrong", max_retries=0)
    with pytest.raises(anthropic.AuthenticationError):
        a.messages.create(model="", max_tokens=5, messages=QUESTION)


def test_anthropic_tool_use_and_tool_result(calling):
    server, _ = calling
    a = anthropic.Anthropic(base_url=server.url, api_key=KEY, max_retries=0)
    tools = [
        {
            "name": "get_weather",
            "description": "Weather now",
            "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}},
        }
    ]
    out = a.messages.create(model="", max_tokens=40, messages=QUESTION, tools=tools)
    assert out.stop_reason == "tool_use"
    (use,) = [b for b in out.content if b.type == "tool_use"]
    assert (use.name, use.input) == ("get_weather", {"city": "Bern"})
    with a.messages.stream(model="", max_tokens=40, messages=QUESTION, tools=tools) as stream:
        final = stream.get_final_message()
    assert [(b.type, b.input) for b in final.content if b.type == "tool_use"] == [
        ("tool_use", {"city": "Bern"})
    ]
    follow = [
        *QUESTION,
        {"role": "assistant", "content": out.content},
        {
            "role": "user",
            "content": [{"type": "tool_result", "tool_use_id": use.id, "content": "21 C"}],
        },
    ]
    answer = a.messages.create(model="", max_tokens=40, messages=follow, tools=tools)
    assert answer.content[0].text == "It is 21 C in Bern."


def test_reasoning_content_when_thinking_is_on(thinking):
    _, client = thinking
    on = {"chat_template_kwargs": {"enable_thinking": True}}
    out = ask(client, extra_body=on)
    assert out.choices[0].message.reasoning_content == "Let me think."
    assert out.choices[0].message.content == "Grüezi mitenand!"
    chunks = list(ask(client, stream=True, reasoning_effort="low"))
    deltas = [c.choices[0].delta for c in chunks if c.choices]
    thought = "".join(getattr(d, "reasoning_content", None) or "" for d in deltas)
    assert thought == "Let me think."
    assert "".join(d.content or "" for d in deltas) == "Grüezi mitenand!"


def test_anthropic_thinking_blocks(thinking):
    server, _ = thinking
    a = anthropic.Anthropic(base_url=server.url, api_key="unused", max_retries=0)
    on = {"type": "enabled", "budget_tokens": 1024}
    out = a.messages.create(model="", max_tokens=40, messages=QUESTION, thinking=on)
    assert [
        (b.type, getattr(b, "thinking", None) or getattr(b, "text", None)) for b in out.content
    ] == [("thinking", "Let me think."), ("text", "Grüezi mitenand!")]
    with a.messages.stream(model="", max_tokens=40, messages=QUESTION, thinking=on) as stream:
        final = stream.get_final_message()
    assert [b.type for b in final.content] == ["thinking", "text"]
    assert final.content[0].thinking == "Let me think."


def test_a_request_for_another_cached_model_loads_it(tiny_model_dir, scripted, tmp_path):
    """A repo id in the Hugging Face cache is loaded on request (never downloaded); the model
    given at start comes back when named again."""
    import shutil

    hub = tmp_path / "hub"
    snapshot = hub / "models--swiss-ai--Apertus-thinker" / "snapshots" / "0123abc"
    shutil.copytree(scripted("deliberation"), snapshot)
    (snapshot.parents[1] / "refs").mkdir()
    (snapshot.parents[1] / "refs" / "main").write_text("0123abc")
    server = Served(tiny_model_dir, env={"HF_HUB_CACHE": str(hub)})
    try:
        client = openai.OpenAI(base_url=server.base, api_key="unused", max_retries=0)
        owners = {m.id: m.owned_by for m in client.models.list().data}
        assert owners["swiss-ai/Apertus-thinker"] == "cache"
        on = {"chat_template_kwargs": {"enable_thinking": True}}
        out = client.chat.completions.create(
            model="swiss-ai/Apertus-thinker", messages=QUESTION, max_tokens=40, extra_body=on
        )
        assert out.choices[0].message.reasoning_content == "Let me think."
        back = client.chat.completions.create(
            model=tiny_model_dir.name, messages=QUESTION, max_tokens=3, extra_body=on
        )
        assert getattr(back.choices[0].message, "reasoning_content", None) != "Let me think."
        assert [line.split()[1] for line in server.log if line.startswith("loaded ")] == [
            str(tiny_model_dir),
            "swiss-ai/Apertus-thinker",
            str(tiny_model_dir),
        ]
    finally:
        server.stop()
