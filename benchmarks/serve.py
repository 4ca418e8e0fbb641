"""`apertus-mlx serve` under load: aggregate tokens/s of 1, 2, 4 and 8 concurrent requests
against the same requests sent one at a time, and the time to first token of a follow-up turn
with the previous turn's cache reused and cold; `mlx_lm.server` on the same checkpoint and
requests when it starts.

    python -m benchmarks.serve            # the narrow shape, 32 tokens per answer
    python -m benchmarks.serve --tokens 64 --no-mlx-lm

Both servers are real processes driven over HTTP by the official `openai` client, greedy,
with the same prompts. Answers may end early at an end token: tokens/s counts what was
generated.
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

from .turns import TURN, checkpoint

LEVELS = (1, 2, 4, 8)


_runs = iter(range(1_000_000))


def prompts(n: int) -> list[list[dict]]:
    """`n` prompts no earlier request began with: no run reads another's prompt cache."""
    run = next(_runs)
    return [[{"role": "user", "content": f"{run}.{i} {TURN}"}] for i in range(n)]


def answer(client, model: str, messages: list[dict], tokens: int) -> int:
    out = client.chat.completions.create(
        model=model, messages=messages, max_tokens=tokens, temperature=0
    )
    return out.usage.completion_tokens


def throughput(client, model: str, n: int, tokens: int, together: bool) -> float:
    """Aggregate generated tokens/s of `n` requests, together or one after the other."""
    batch = prompts(n)
    started = time.perf_counter()
    if together:
        with ThreadPoolExecutor(n) as pool:
            said = sum(pool.map(lambda m: answer(client, model, m, tokens), batch))
    else:
        said = sum(answer(client, model, m, tokens) for m in batch)
    return said / (time.perf_counter() - started)


def ttft(client, model: str, messages: list[dict]) -> tuple[float, int]:
    """(seconds to the first answer text, prompt tokens served from a cache)."""
    started = time.perf_counter()
    stream = client.chat.completions.create(
        model=model,
        messages=messages,
        max_tokens=4,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    first, cached = None, 0
    for chunk in stream:
        if first is None and chunk.choices and chunk.choices[0].delta.content:
            first = time.perf_counter() - started
        details = chunk.usage and chunk.usage.prompt_tokens_details
        if details is not None:
            cached = details.cached_tokens or 0
    return (first if first is not None else time.perf_counter() - started), cached


def follow_up(client, model: str, history_turns: int) -> tuple[float, float, int, int]:
    """(TTFT with the cache reused, TTFT cold, cached tokens, tokens of the previous prompt
    and answer) of a follow-up turn."""
    convo = [
        {"role": "system", "content": "Du bist hilfreich."},
        {"role": "user", "content": TURN * history_turns},
    ]
    first = client.chat.completions.create(
        model=model, messages=convo, max_tokens=32, temperature=0
    )
    convo += [
        {"role": "assistant", "content": first.choices[0].message.content},
        {"role": "user", "content": "Und jetzt?"},
    ]
    warm, cached = ttft(client, model, convo)
    cold_convo = [{"role": "system", "content": "Du bist sehr hilfreich."}, *convo[1:]]
    cold, _ = ttft(client, model, cold_convo)
    before = first.usage.prompt_tokens + first.usage.completion_tokens
    return warm, cold, cached, before


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def mlx_lm_server(path) -> tuple[subprocess.Popen, str]:
    import httpx2

    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "mlx_lm.server", "--model", str(path), "--port", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}"
    for _ in range(600):
        if proc.poll() is not None:
            raise RuntimeError(f"mlx_lm.server exited with {proc.returncode}")
        try:
            httpx2.get(url + "/health", timeout=1)
            return proc, url + "/v1"
        except httpx2.HTTPError:
            time.sleep(0.1)  # a server starting: nothing to wait on but its port
    proc.kill()
    raise RuntimeError("mlx_lm.server did not start")


def measure(name: str, base: str, model: str, tokens: int, history: int) -> None:
    import openai

    client = openai.OpenAI(base_url=base, api_key="unused", max_retries=0, timeout=600)
    answer(client, model, prompts(1)[0], 2)  # warm-up: compiled graphs
    for n in LEVELS:
        seq = throughput(client, model, n, tokens, together=False)
        par = throughput(client, model, n, tokens, together=True)
        print(
            f"{name:8} {n} concurrent: {par:7.1f} tok/s | one at a time: {seq:7.1f} tok/s "
            f"| x{par / seq:.2f}",
            flush=True,
        )
    warm, cold, cached, before = follow_up(client, model, history)
    print(
        f"{name:8} follow-up TTFT: {warm * 1000:.0f} ms with the cache ({cached} of the "
        f"previous turn's {before} prompt+answer tokens reused, {cached / before:.1%}), "
        f"{cold * 1000:.0f} ms cold",
        flush=True,
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.serve")
    parser.add_argument("--tokens", type=int, default=32, help="Tokens per answer.")
    parser.add_argument("--history", type=int, default=8, help="Turns of text before a follow-up.")
    parser.add_argument("--no-mlx-lm", action="store_true", help="Only our server.")
    args = parser.parse_args(argv)
    sys.path.insert(0, os.getcwd())
    from tests.servers import Served

    path = checkpoint()
    print(f"narrow shape ({path.name}), {args.tokens} tokens per answer, greedy", flush=True)
    ours = Served(path)
    try:
        measure("ours", ours.base, "", args.tokens, args.history)
    finally:
        ours.stop()
    if args.no_mlx_lm:
        return 0
    try:
        proc, base = mlx_lm_server(path)
    except (RuntimeError, OSError) as e:
        print(f"mlx_lm   not measured: {e}")
        return 0
    try:
        measure("mlx_lm", base, str(path), args.tokens, args.history)
    finally:
        proc.terminate()
        proc.wait(30)
    return 0


if __name__ == "__main__":
    sys.exit(main())
