"""`apertus-mlx serve` as clients use it: a real server on a free port, driven by the official
`openai` and `anthropic` clients. One server per model, shared by the module."""

from __future__ import annotations

import json
import threading

import httpx2 as httpx  # the HTTP client the openai package itself uses
import pytest

from tests.servers import Served
from tests.test_cli import cli

openai = pytest.importorskip("openai")
anthropic = pytest.importorskip("anthropic")

HI = [{"role": "user", "content": "Grüezi! Wie geht es?"}]


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    server = Served(tiny_model_dir, "--cors-origin", "http://example.org")
    yield server
    server.stop()


@pytest.fixture(scope="module")
def client(tiny, tiny_model_dir):
    c = openai.OpenAI(base_url=tiny.base, api_key="unused", max_retries=0)
    c.model_name = tiny_model_dir.name  # the folder's name names the model given at start
    return c


def chat(client, messages=HI, **kw):
    kw.setdefault("max_tokens", 12)
    kw.setdefault("temperature", 0)
    kw.setdefault("model", client.model_name)
    return client.chat.completions.create(messages=messages, **kw)


def streamed(client, messages=HI, **kw) -> tuple[str, list]:
    chunks = list(chat(client, messages, stream=True, **kw))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    return text, chunks


def test_stream_and_not_give_the_same_text_as_generate(client, tiny, tiny_model_dir):
    whole = chat(client, model=str(tiny_model_dir))
    text, chunks = streamed(client)
    assert whole.choices[0].message.content == text
    assert whole.choices[0].finish_reason == chunks[-1].choices[0].finish_reason
    out = cli("generate", HI[0]["content"], "-m", str(tiny_model_dir), "--temp", "0", "-n", "12")
    assert out.returncode == 0, out.stderr
    assert out.stdout == text + "\n"
    assert any(line.startswith("POST /v1/chat/completions 200 ") for line in tiny.log)


def test_a_follow_up_reuses_the_prompt_and_the_answer(client):
    first = chat(client, [{"role": "user", "content": "Erzähl mir vom Matterhorn."}])
    answer = first.choices[0].message.content
    follow = [
        {"role": "user", "content": "Erzähl mir vom Matterhorn."},
        {"role": "assistant", "content": answer},
        {"role": "user", "content": "Und vom Eiger?"},
    ]
    second = chat(client, follow, max_tokens=4)
    before = first.usage.prompt_tokens + first.usage.completion_tokens
    cached = second.usage.prompt_tokens_details.cached_tokens
    # all of it is reused but the answer's last token, when the model never read it
    assert cached in (before - 1, before), (cached, before)
    assert cached / before >= 0.9


def test_stop_strings_end_the_answer_before_them(client):
    full = chat(client, max_tokens=16).choices[0].message.content
    stop = full[len(full) // 2 : len(full) // 2 + 2]
    cut = chat(client, max_tokens=16, stop=[stop])
    assert cut.choices[0].message.content == full[: full.index(stop)]
    assert cut.choices[0].finish_reason == "stop"


def test_logprobs_stream_and_not(client):
    whole = chat(client, logprobs=True, top_logprobs=3, max_tokens=6)
    content = whole.choices[0].logprobs.content
    assert len(content) == 6
    for entry in content:  # greedy: the chosen token is the most likely one
        assert len(entry.top_logprobs) == 3
        assert entry.logprob == pytest.approx(entry.top_logprobs[0].logprob)
        assert entry.token == entry.top_logprobs[0].token
    _, chunks = streamed(client, logprobs=True, top_logprobs=3, max_tokens=6)
    said = [
        e.logprob
        for c in chunks
        if c.choices and c.choices[0].logprobs
        for e in c.choices[0].logprobs.content or ()
    ]
    assert said == pytest.approx([e.logprob for e in content])


def test_seeds_repeat_samples(client):
    def sample(seed):
        return chat(client, temperature=1.5, seed=seed, max_tokens=10).choices[0].message.content

    assert sample(7) == sample(7)
    assert len({sample(7), sample(8), sample(9)}) > 1


def test_usage_in_the_stream_when_asked(client):
    _, chunks = streamed(client, stream_options={"include_usage": True}, max_tokens=5)
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 5
    _, chunks = streamed(client, max_tokens=5)
    assert all(c.usage is None for c in chunks)


def test_json_schema_answers_validate(client):
    jsonschema = pytest.importorskip("jsonschema")
    schema = {
        "type": "object",
        "properties": {"city": {"type": "string", "maxLength": 12}, "n": {"type": "integer"}},
        "required": ["city", "n"],
        "additionalProperties": False,
    }
    out = chat(
        client,
        max_tokens=80,
        temperature=1.0,
        seed=3,
        response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": schema}},
    )
    jsonschema.validate(json.loads(out.choices[0].message.content), schema)
    with pytest.raises(openai.BadRequestError, match="schema"):
        chat(
            client,
            response_format={
                "type": "json_schema",
                "json_schema": {"name": "x", "schema": {"type": 7}},
            },
        )


def test_completions_from_text_and_from_ids(client):
    text = client.completions.create(
        model=client.model_name, prompt="Es war einmal", max_tokens=6, temperature=0
    )
    assert text.usage.completion_tokens == 6
    ids = client.completions.create(
        model=client.model_name, prompt=[1, 300, 301], max_tokens=3, temperature=0
    )
    assert ids.usage.prompt_tokens == 3
    chunks = list(
        client.completions.create(
            model=client.model_name,
            prompt="Es war einmal",
            max_tokens=6,
            temperature=0,
            stream=True,
        )
    )
    assert "".join(c.choices[0].text for c in chunks if c.choices) == text.choices[0].text


def test_concurrent_streams_equal_sequential_ones(client):
    prompts = [[{"role": "user", "content": f"Frage {i}: warum?"}] for i in range(4)]
    sequential = [streamed(client, p)[0] for p in prompts]
    results: dict[int, str] = {}
    threads = [
        threading.Thread(target=lambda i=i: results.__setitem__(i, streamed(client, prompts[i])[0]))
        for i in range(4)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert [results[i] for i in range(4)] == sequential


def test_anthropic_messages_stream_and_not(tiny, client):
    a = anthropic.Anthropic(base_url=tiny.url, api_key="unused", max_retries=0)
    greedy = {"temperature": 0}  # this client version no longer sends it itself
    whole = a.messages.create(
        model=client.model_name, max_tokens=12, messages=HI, extra_body=greedy
    )
    with a.messages.stream(
        model=client.model_name, max_tokens=12, messages=HI, extra_body=greedy
    ) as stream:
        text = "".join(stream.text_stream)
        final = stream.get_final_message()
    assert whole.content[0].text == text == chat(client).choices[0].message.content
    assert whole.stop_reason == final.stop_reason
    assert final.usage.output_tokens == whole.usage.output_tokens


def test_errors_have_the_api_shapes(tiny, client):
    with pytest.raises(openai.BadRequestError, match="n=1"):
        chat(client, n=2)
    with pytest.raises(openai.NotFoundError, match="not on this machine"):
        chat(client, model="swiss-ai/not-downloaded")
    with pytest.raises(openai.BadRequestError, match=r"too long: \d+ tokens, \d+ more"):
        chat(client, [{"role": "user", "content": "Berg " * 600}])
    bad = httpx.post(tiny.base + "/chat/completions", content=b"{not json")
    assert bad.status_code == 400 and set(bad.json()["error"]) == {
        "message",
        "type",
        "param",
        "code",
    }
    wrong = httpx.post(tiny.base + "/chat/completions", json={"messages": "hi"})
    assert wrong.status_code == 400 and "messages" in wrong.json()["error"]["message"]
    big = httpx.post(tiny.base + "/chat/completions", content=b" " * (17 << 20))
    assert big.status_code == 413
    a = httpx.post(tiny.base + "/messages", json={"messages": []})
    assert a.status_code == 400 and a.json()["type"] == "error"
    assert httpx.get(tiny.url + "/nowhere").status_code == 404
    models = client.models.list().data
    assert {m.owned_by for m in models} >= {"local", "catalog"}
    assert httpx.get(tiny.url + "/health").json()["status"] == "ok"
    allowed = httpx.options(
        tiny.base + "/chat/completions",
        headers={"Origin": "http://example.org", "Access-Control-Request-Method": "POST"},
    )
    assert allowed.headers["access-control-allow-origin"] == "http://example.org"
    assert chat(client, max_tokens=2).usage.completion_tokens == 2  # still serving
    assert not any("Traceback" in line for line in tiny.log)


def test_a_non_loopback_bind_needs_a_key(tiny_model_dir):
    out = cli("serve", "-m", str(tiny_model_dir), "--host", "0.0.0.0", "--port", "0")
    assert out.returncode == 2
    assert out.stderr.count("\n") == 1 and "--api-key" in out.stderr
