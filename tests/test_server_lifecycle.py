"""The server's life: a client that hangs up frees its slot, a full queue answers 429, the
output filter applies to streamed answers, and Ctrl+C / SIGTERM end it cleanly."""

from __future__ import annotations

import json
import signal

import httpx2 as httpx  # the HTTP client the openai package itself uses
import pytest

from apertus_mlx.output_filter import MARKER, words
from tests.servers import Served
from tests.test_cli import cli
from tests.test_filter_cli import write_filter

openai = pytest.importorskip("openai")

ENDLESS = {
    "messages": [{"role": "user", "content": "Erzähl mir alles."}],
    "max_tokens": 50000,
    "temperature": 0,
    "stream": True,
}


def first_line(lines) -> str:
    """The first SSE data line of a streamed answer with some text (`lines`: an iterator)."""
    for line in lines:
        if line.startswith("data: ") and '"content": ""' not in line:
            return line
    raise AssertionError("the stream ended early")


def wait_idle(server: Served) -> None:
    """Until the server holds no request (the model thread has let go of the last one)."""
    with httpx.Client() as c:
        for _ in range(3000):
            if c.get(server.url + "/health").json()["requests"] == 0:
                return
            c.get(server.url + "/v1/models")  # a round trip instead of a sleep
    raise AssertionError("the server never became idle")


def test_a_hung_up_client_frees_its_slot_and_a_full_queue_is_429(endless_model):
    server = Served(endless_model, "--max-concurrent", "1", "--max-queue", "0")
    try:
        with httpx.Client(timeout=60) as c:
            with c.stream("POST", server.base + "/chat/completions", json=ENDLESS) as r:
                assert r.status_code == 200
                lines = r.iter_lines()  # kept: dropping it closes the response (a hang-up)
                first_line(lines)
                busy = c.post(server.base + "/chat/completions", json={**ENDLESS, "stream": False})
                assert (
                    busy.status_code == 429 and busy.json()["error"]["type"] == "rate_limit_error"
                )
            # hung up mid-answer: the endless answer stops and the next request is served
            wait_idle(server)
            short = {**ENDLESS, "stream": False, "max_tokens": 3}
            assert c.post(server.base + "/chat/completions", json=short).status_code == 200
            with c.stream("POST", server.base + "/chat/completions", json=ENDLESS) as r:
                lines = r.iter_lines()
                first_line(lines)
                server.proc.send_signal(signal.SIGINT)  # Ctrl+C: the answer is cut, cleanly
                rest = [line for line in lines if line]
            assert rest[-1] == "data: [DONE]"
            assert '"finish_reason": "stop"' in rest[-2]
        assert server.wait() == 130
        assert not any("Traceback" in line for line in server.log)
    finally:
        server.stop(signal.SIGKILL)


def test_a_conversation_beside_a_running_one_reads_their_shared_opening(endless_model):
    """Two conversations sharing a long opening, the second starting while the first still
    answers (it never ends): the second reads the opening from a cache, as much of it as
    when nothing else runs."""
    opening = "Du bist ein Bergführer im Berner Oberland. " * 6

    def ask(c: httpx.Client, last: str, **kw) -> dict:
        messages = [{"role": "system", "content": opening + last}]
        out = c.post(
            server.base + "/chat/completions",
            json={**ENDLESS, "messages": messages, "stream": False, **kw},
        )
        assert out.status_code == 200, out.text
        return out.json()["usage"]

    server = Served(endless_model)
    try:
        with httpx.Client(timeout=60) as c:
            first = ask(c, "Sei kurz.", max_tokens=1)
            assert first["prompt_tokens_details"]["cached_tokens"] < first["prompt_tokens"] / 2
            running = {**ENDLESS, "messages": [{"role": "system", "content": opening + "Lang."}]}
            with c.stream("POST", server.base + "/chat/completions", json=running) as r:
                lines = r.iter_lines()
                first_line(lines)  # its prompt is read: it holds a cache of its own
                beside = ask(c, "Sei nett.", max_tokens=2)["prompt_tokens_details"]
            wait_idle(server)
            alone = ask(c, "Sei froh.", max_tokens=2)["prompt_tokens_details"]
        assert beside["cached_tokens"] == alone["cached_tokens"] > first["prompt_tokens"] / 2
    finally:
        server.stop(signal.SIGKILL)


def test_sigterm_ends_the_answers_and_exits_143(endless_model):
    server = Served(endless_model)
    try:
        with (
            httpx.Client(timeout=60) as c,
            c.stream("POST", server.base + "/chat/completions", json=ENDLESS) as r,
        ):
            lines = r.iter_lines()
            first_line(lines)
            server.proc.send_signal(signal.SIGTERM)
            rest = [line for line in lines if line]
        assert rest[-1] == "data: [DONE]"
        assert server.wait() == 143
    finally:
        server.stop(signal.SIGKILL)


def test_the_output_filter_applies_to_a_streamed_answer(tiny_model_dir, tmp_path, monkeypatch):
    prompt = "Grüezi mitenand!"
    plain = cli("generate", prompt, "-m", str(tiny_model_dir), "--temp", "0", "-n", "24")
    said = words(plain.stdout)
    assert len(said) >= 3, plain.stdout
    home = tmp_path / "home"
    monkeypatch.setenv("APERTUS_MLX_HOME", str(home))
    assert cli("filter", "install", write_filter(tmp_path / "f.json", [said[1]])).returncode == 0
    server = Served(tiny_model_dir, env={"APERTUS_MLX_HOME": str(home)})
    try:
        client = openai.OpenAI(base_url=server.base, api_key="unused", max_retries=0)
        chunks = client.chat.completions.create(
            model="",
            messages=[{"role": "user", "content": prompt}],
            max_tokens=24,
            temperature=0,
            stream=True,
        )
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        assert MARKER in text
        assert said[1] not in words(text)
    finally:
        server.stop()


def test_an_idle_model_is_unloaded_and_loads_again(tiny_model_dir):
    server = Served(tiny_model_dir, "--idle-unload", "0.002")  # 0.12 s
    try:
        client = openai.OpenAI(base_url=server.base, api_key="unused", max_retries=0)
        ask = dict(model="", messages=[{"role": "user", "content": "Hoi"}], max_tokens=3)
        assert client.chat.completions.create(**ask).usage.completion_tokens == 3
        with httpx.Client() as c:
            for _ in range(100_000):  # round trips until the model thread lets go of it
                if not c.get(server.url + "/health").json()["loaded"]:
                    break
            else:
                raise AssertionError("the idle model was never unloaded")
        assert client.chat.completions.create(**ask).usage.completion_tokens == 3
        assert httpx.get(server.url + "/health").json()["loaded"]
        assert sum(line.startswith("unloaded ") for line in server.log) >= 1
    finally:
        server.stop()


def test_an_internal_error_is_one_line_and_a_500():
    """The guard around the routes: a bug becomes a 500 in the API's shape and one log line."""
    import asyncio

    from apertus_mlx.server.app import Guard

    async def broken(scope, receive, send):
        raise ZeroDivisionError("boom")

    lines: list[str] = []
    sent: list[dict] = []

    async def receive():
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message):
        sent.append(message)

    scope = {"type": "http", "method": "POST", "path": "/v1/messages", "headers": []}
    asyncio.run(Guard(broken, None, lines.append)(scope, receive, send))
    assert sent[0]["status"] == 500
    body = json.loads(sent[1]["body"])
    assert body["type"] == "error" and body["error"]["type"] == "api_error"
    assert lines[0] == "apertus-mlx: internal error: ZeroDivisionError: boom"
    assert lines[1].startswith("POST /v1/messages 500 0 tokens")


def test_save_keeps_each_exchange_in_the_history(tiny_model_dir, tmp_path):
    """`--save`: a conversation resent with the answer goes on in the same saved
    conversation; another conversation is another; tool results are not kept."""
    from apertus_mlx.store import Store

    home = tmp_path / "home"
    server = Served(tiny_model_dir, "--save", env={"APERTUS_MLX_HOME": str(home)})
    try:
        client = openai.OpenAI(base_url=server.base, api_key="unused", max_retries=0)

        def ask(messages: list[dict], **kw) -> str:
            out = client.chat.completions.create(
                model="", messages=messages, max_tokens=6, temperature=0, **kw
            )
            return out.choices[0].message.content

        talk = [
            {"role": "system", "content": "Sei kurz."},
            {"role": "user", "content": "Grüezi!"},
        ]
        talk.append({"role": "assistant", "content": ask(talk)})
        talk.append({"role": "user", "content": "Und jetzt?"})
        streamed = client.chat.completions.create(
            model="", messages=talk, max_tokens=6, temperature=0, stream=True
        )
        talk.append({"role": "assistant", "content": "".join(
            c.choices[0].delta.content or "" for c in streamed if c.choices
        )})  # fmt: skip
        other = [{"role": "user", "content": "Wie spät ist es?"}]
        other.append({"role": "assistant", "content": ask(other)})
        tools = [*talk, {"role": "tool", "content": "42", "tool_call_id": "x"}]
        ask([*tools, {"role": "user", "content": "Danke"}])
    finally:
        server.stop()
    with Store.open(home / "history.db") as store:
        conversations = store.list_conversations()
        saved = {c.title: c for c in conversations}
        assert len(conversations) == 2 and sorted(saved) == ["Grüezi!", "Wie spät ist es?"]
        kept = saved["Grüezi!"]
        assert kept.system == "Sei kurz."
        said = [(m.role, m.content) for m in store.branch(kept.id)]
        assert said == [(m["role"], m["content"]) for m in talk[1:]]
        assert [(m.role, m.content) for m in store.branch(saved["Wie spät ist es?"].id)] == [
            (m["role"], m["content"]) for m in other
        ]
    assert sum("keeps no exchange with tool results" in line for line in server.log) == 1


def test_save_with_a_history_that_cannot_be_written_fails_at_start(tiny_model_dir, tmp_path):
    blocked = tmp_path / "a-file"
    blocked.write_text("")
    out = cli("serve", "-m", str(tiny_model_dir), "--port", "0", "--save",
              env={"APERTUS_MLX_HOME": str(blocked / "home")})  # fmt: skip
    assert out.returncode != 0 and not out.stdout
    assert out.stderr.count("\n") == 1 and "history directory" in out.stderr
