"""The chat UI's worst event-loop stall while an answer streams, at the tiny test model's speed
(a few hundred tokens per second on 2 CPU cores, far faster than a real model streams, so
every redraw path is exercised): the target is at most 50 ms.

    python -m benchmarks.ui_stall                # 3 answers of 600 tokens
    python -m benchmarks.ui_stall --tokens 300 --answers 1 --json
    python -m benchmarks.ui_stall --history 200   # a lived-in history: 200 conversations listed

Runs the real app headless (Textual's `run_test`) on a random-weight checkpoint whose answers
never end by themselves (the test suite's `endless` model), and a probe task on the same
event loop that asks to wake every 5 ms: how late it wakes is how long the loop was blocked.
On a shared machine the stalls swing with its load (printed): the event loop's CPU time per
answer is the steadier number to compare changes by.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import tempfile
import time
from pathlib import Path

from .models import CACHE

PROBE_S = 0.005


def checkpoint() -> Path:
    """The endless test checkpoint with its tokenizer (built once under the bench cache)."""
    out = CACHE / "ui-endless"
    if not (out / "config.json").is_file():
        sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
        from checkpoints import build_endless_checkpoint

        from fixtures.tokenizer import build_tokenizer

        tokenizer = CACHE / "ui-tokenizer"
        tokenizer.mkdir(parents=True, exist_ok=True)
        vocab = build_tokenizer(tokenizer)
        out.mkdir(parents=True, exist_ok=True)
        build_endless_checkpoint(out, tokenizer, vocab)
    return out


async def measure(model: Path, tokens: int, answers: int) -> dict:
    from apertus_mlx_app.app import ChatApp
    from apertus_mlx_app.settings import ChatSettings

    app = ChatApp(str(model), ChatSettings(temperature=0.0, max_tokens=tokens))
    lags: list[tuple[float, int]] = []
    streaming = False

    async def probe() -> None:
        loop = asyncio.get_running_loop()
        while True:
            start = loop.time()
            await asyncio.sleep(PROBE_S)
            if streaming:
                running = app.chat.running
                # how far the answer was: 0 at its start (send, mount), -1 once it is done (its
                # final render, the list refresh) until the benchmark notices
                lags.append((loop.time() - start - PROBE_S, len(running.text) if running else -1))

    rates, cpu = [], 0.0
    async with app.run_test(size=(80, 24)) as pilot:
        while app.chat is None or app.chat.loaded is None:
            await pilot.pause(0.05)
        task = asyncio.create_task(probe())
        for i in range(answers):
            app.chat.prompt.text = f"Tell me a long story, part {i + 1}"
            app.chat.prompt.focus()
            streaming = True
            started, started_cpu = time.perf_counter(), time.thread_time()
            await pilot.press("enter")
            await pilot.pause(0.05)
            while app.chat.running is not None:
                await pilot.pause(0.02)
            streaming = False
            cpu += time.thread_time() - started_cpu  # the event loop's own work, in CPU time
            answer = app.chat.messages.answers()[-1]
            rates.append(len(answer.text.split()) / (time.perf_counter() - started))
            await pilot.press("ctrl+n")
        task.cancel()
    lags.sort()
    steady = sorted(lag for lag, at in lags if at > 0)  # once the answer's text is streaming
    return {
        "answers": answers,
        "max_tokens": tokens,
        "worst_stall_ms": round(lags[-1][0] * 1000, 1),
        "worst_at_chars": lags[-1][1],
        "p99_stall_ms": round(lags[int(len(lags) * 0.99)][0] * 1000, 1),
        "worst_streaming_ms": round(steady[-1] * 1000, 1) if steady else None,
        "words_per_s": round(sum(rates) / len(rates), 1),
        # less noisy than the stalls on a shared machine: what the loop itself spent
        "ui_cpu_ms_per_answer": round(cpu * 1000 / answers),
        "load_1min": round(os.getloadavg()[0], 2),
        "cores": os.cpu_count(),
        "target_ms": 50,
    }


def lived_in(conversations: int) -> None:
    """A history of `conversations` short exchanges, as a long-time user's sidebar lists."""
    from apertus_mlx.store import Store

    with Store.open() as store:
        for i in range(conversations):
            c = store.create_conversation(model="bench", title=f"Earlier chat {i + 1}")
            store.add_message(c.id, "user", f"Question {i + 1}")


def where(at: int) -> str:
    return "as its answer ended" if at < 0 else f"at {at} characters of its answer"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.ui_stall",
                                     description=__doc__.split("\n")[0])  # fmt: skip
    parser.add_argument("--tokens", type=int, default=600, help="Tokens per answer.")
    parser.add_argument("--answers", type=int, default=3, help="Answers streamed.")
    parser.add_argument("--history", type=int, default=0,
                        help="Conversations in the history beforehand.")  # fmt: skip
    parser.add_argument("--json", action="store_true", help="One JSON object.")
    args = parser.parse_args(argv)
    model = checkpoint()
    with tempfile.TemporaryDirectory() as home:
        os.environ["APERTUS_MLX_HOME"] = home  # a throwaway history and config
        lived_in(args.history)
        result = asyncio.run(measure(model, args.tokens, args.answers))
    if args.json:
        print(json.dumps(result))
    else:
        print(f"chat UI while streaming ({result['answers']} answers of {result['max_tokens']} "
              f"tokens, ~{result['words_per_s']} words/s): worst event-loop stall "
              f"{result['worst_stall_ms']} ms ({where(result['worst_at_chars'])}), p99 "
              f"{result['p99_stall_ms']} ms, worst once text streams "
              f"{result['worst_streaming_ms']} ms (target <= {result['target_ms']} ms); event loop "
              f"CPU {result['ui_cpu_ms_per_answer']} ms per answer; load {result['load_1min']} "
              f"on {result['cores']} cores"
              )  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
