"""Follow-up turns: time to first token of the next answer with and without the KV cache of
the conversation so far, and after a restart with the cache saved to disk.

    python -m benchmarks.turns                   # 1k, 2k and 4k tokens of history
    python -m benchmarks.turns --history 512 --turns 100

It also times building the next turn's prompt after 50 to 400 turns: it must grow no faster
than the history (a prompt is two renderings, and only new text is encoded).

Runs on the narrow random-weight shape of `make bench` (20 layers, like the 0.5B, but
small enough that a 4k-token history is read in seconds on a CPU) with the test suite's
tokenizer; what matters is the ratio, which grows with the history.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

import mlx.core as mx

from .models import CACHE, MODELS, ensure

NEW_MESSAGE = "Und jetzt: was isch de Unterschied zwüsche Rösti und Gschwellti?"
TURN = (
    "Grüezi! Peux-tu m'expliquer la fondue moitié-moitié? Ja, gern: Gruyère und Vacherin "
    "fribourgeois, je zur Hälfte, mit Weisswein und etwas Kirsch. "
)


def checkpoint() -> Path:
    """The narrow bench checkpoint with a tokenizer beside it (built once)."""
    out = CACHE / "narrow-chat"
    if not (out / "tokenizer.json").is_file():
        from fixtures.tokenizer import build_tokenizer

        src = ensure(next(m for m in MODELS if m.name == "narrow-bf16"))
        tmp = CACHE / "narrow-chat.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.copytree(src, tmp)
        build_tokenizer(tmp)
        shutil.rmtree(out, ignore_errors=True)
        tmp.rename(out)
    return out


def history(tokenizer, tokens: int) -> list[dict]:
    """A conversation (ending with an answer) whose prompt is about `tokens` long."""
    messages: list[dict] = []
    while len(tokenizer.apply_chat_template(messages, add_generation_prompt=False)) < tokens:
        messages += [{"role": "user", "content": TURN}, {"role": "assistant", "content": TURN}]
    return messages


def first_token_s(model, tokenizer, ids: list[int], cache) -> float:
    from apertus_mlx.generate import Done, generate

    *_, done = generate(model, tokenizer, ids, max_tokens=1, cache=cache, end_tokens=())
    assert isinstance(done, Done)
    return done.stats.ttft_s


def measure(model, tokenizer, tokens: int) -> dict[str, float]:
    from apertus_mlx.saved_caches import SavedCaches, identity

    messages = history(tokenizer, tokens)
    before = tokenizer.apply_chat_template(messages, add_generation_prompt=False)
    ids = tokenizer.apply_chat_template([*messages, {"role": "user", "content": NEW_MESSAGE}])
    cold = first_token_s(model, tokenizer, ids, model.make_cache())

    warm_cache = model.make_cache()
    model(mx.array([before]), cache=warm_cache)  # what the previous turn left in the cache
    mx.eval(warm_cache.arrays())
    with tempfile.TemporaryDirectory() as d:
        saved = SavedCaches(d)
        ident = identity(model, "bench", None)
        saved.save("c", warm_cache, ident)
        warm_cache.keep_prefix(ids)
        warm = first_token_s(model, tokenizer, ids, warm_cache)
        start = time.perf_counter()
        loaded = saved.load("c", model.make_cache(), ident).cache  # as a new process would
        loaded.keep_prefix(ids)
        reopened = time.perf_counter() - start + first_token_s(model, tokenizer, ids, loaded)
    return {"history": len(before), "cold": cold, "warm": warm, "reopened": reopened}


def prompt_build_s(service, turns: int, repeats: int = 3) -> tuple[float, int]:
    """Seconds to build the next turn's prompt (the turn service's own path: token-exact,
    fitted to the window) after `turns` exchanges whose answers carry their tokens; and its
    length in tokens. Best of `repeats`: the first build of a history pays for encoding it,
    the next ones find every earlier run of text encoded, as a chat's next turn does."""
    from apertus_mlx.settings import TurnSettings

    tok = service.tokenizer
    answer = tok.encode(TURN) + [tok.token_to_id("<|assistant_end|>")]
    messages: list[dict] = [{"role": "system", "content": "Du bisch hilfriich."}]
    for i in range(turns):
        messages += [
            {"role": "user", "content": f"{NEW_MESSAGE} ({i})"},
            {"role": "assistant", "content": TURN, "tokens": answer},
        ]
    messages.append({"role": "user", "content": NEW_MESSAGE})
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        prompt, _ = service.prompt(messages, TurnSettings())
        best = min(best, time.perf_counter() - start)
    assert prompt.token_exact
    return best, len(prompt.ids)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.turns", description=__doc__)
    parser.add_argument("--history", type=int, action="append", help="History tokens.")
    parser.add_argument("--turns", type=int, action="append", help="Turns for the prompt row.")
    args = parser.parse_args(argv)
    from apertus_mlx import load
    from apertus_mlx.turn import TurnService

    model, tokenizer = load(checkpoint())
    service = TurnService(model, tokenizer, model_id="bench")
    service.window = 1 << 20  # the prompt row: no turn left out, whatever the model's context
    print("\ntime to build the next turn's prompt (token-exact), after N turns")
    print(f"{'turns':>6} {'tokens':>8} {'ms':>8} {'ms/turn':>8}")
    for n in args.turns or (50, 100, 200, 400):
        seconds, length = prompt_build_s(service, n)
        print(f"{n:>6} {length:>8} {seconds * 1e3:>8.1f} {seconds * 1e3 / n:>8.3f}")
    first_token_s(model, tokenizer, tokenizer.encode("warm up", True), model.make_cache())
    rows = [measure(model, tokenizer, n) for n in args.history or (1024, 2048, 4096)]
    print("\ntime to first token of the next turn, narrow 20-layer shape (seconds)")
    print(f"{'history':>8} {'cold':>8} {'reused':>8} {'speed-up':>9} {'reopened':>9}")
    for r in rows:
        print(
            f"{r['history']:>8} {r['cold']:>8.3f} {r['warm']:>8.3f} "
            f"{r['cold'] / r['warm']:>8.1f}x {r['reopened']:>9.3f}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
