"""What constrained output costs per decode step: the grammar mask against the step itself.

    python -m benchmarks.grammar            # narrow shape, 96 tokens
    python -m benchmarks --grammar

Runs the narrow random-weight shape of `make bench` (20 layers, vocabulary 1536, with the test
suite's tokenizer) greedy, once free and once constrained to a JSON schema, and reports the
milliseconds per decoded token of both and the time the logits processor spent on the grammar
(mask, token bookkeeping, the end-of-budget planning). The same token sequence is then replayed
through llguidance alone and, when it is installed, xgrammar, to compare the engines' mask time.
"""

from __future__ import annotations

import argparse
import time

SCHEMA = {
    "type": "object",
    "properties": {
        "title": {"type": "string"},
        "year": {"type": "integer", "minimum": 1900, "maximum": 2100},
        "tags": {"type": "array", "items": {"type": "string"}},
        "rating": {"enum": ["good", "bad", "ugly"]},
    },
    "required": ["title", "year", "tags", "rating"],
}


def _decode_ms(done) -> float:
    return 1000.0 / done.stats.decode_tps if done.stats.decode_tps else float("nan")


def replay_llguidance(tokenizer, model, tokens: list[int]) -> float:
    """Microseconds per step to consume a token and compute the next mask."""
    import llguidance

    from apertus_mlx.constrained import _lltokenizer, json_schema_grammar
    from apertus_mlx.format import ControlIds

    llt = _lltokenizer(tokenizer, model.args.vocab_size, tuple(model.generation.eos_token_ids))
    grammar = json_schema_grammar(SCHEMA, ControlIds.from_tokenizer(tokenizer))
    m = llguidance.LLMatcher(llt, grammar, log_level=0)
    start = time.perf_counter()
    for t in tokens:
        m.compute_bitmask()
        m.consume_token(t)
    return (time.perf_counter() - start) / len(tokens) * 1e6


def replay_xgrammar(path, model, tokens: list[int]) -> float | None:
    try:
        import xgrammar as xgr
        from transformers import PreTrainedTokenizerFast
    except ImportError:
        return None
    import json

    hf = PreTrainedTokenizerFast(tokenizer_file=str(path / "tokenizer.json"))
    info = xgr.TokenizerInfo.from_huggingface(
        hf, vocab_size=model.args.vocab_size, stop_token_ids=list(model.generation.eos_token_ids)
    )
    compiled = xgr.GrammarCompiler(info).compile_json_schema(json.dumps(SCHEMA))
    matcher = xgr.GrammarMatcher(compiled)
    bitmask = xgr.allocate_token_bitmask(1, model.args.vocab_size)
    start = time.perf_counter()
    for t in tokens:
        matcher.fill_next_token_bitmask(bitmask)
        if not matcher.accept_token(t):
            return float("nan")  # a different JSON whitespace rule: not comparable
    return (time.perf_counter() - start) / len(tokens) * 1e6


def _steady_ms(model, tok, ids, constraint, forward, tokens: int) -> float:
    """Grammar work per step when the budget is far away (the usual case: an answer ends
    long before max tokens), from a run with a budget 8x the tokens generated."""
    from apertus_mlx.generate import generate
    from apertus_mlx.sampling import SamplingParams

    processor = constraint.processor(8 * tokens)
    *_, done = generate(
        model,
        tok,
        ids,
        params=SamplingParams(temperature=0),
        max_tokens=tokens,
        forward=forward,
        logits_processors=[processor],
    )
    return processor.mask_seconds / len(done.tokens) * 1000


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tokens", type=int, default=96)
    args = p.parse_args(argv)

    from apertus_mlx import load
    from apertus_mlx.constrained import Constraint, json_schema_grammar
    from apertus_mlx.format import ControlIds
    from apertus_mlx.generate import Forward, generate
    from apertus_mlx.sampling import SamplingParams

    from .turns import checkpoint

    path = checkpoint()
    model, tok = load(path)
    forward = Forward(model)
    ids = tok.apply_chat_template([{"role": "user", "content": "A film as JSON, please."}])
    greedy = SamplingParams(temperature=0)
    constraint = Constraint.build(
        json_schema_grammar(SCHEMA, ControlIds.from_tokenizer(tok)), model, tok
    )

    def free():
        *_, done = generate(
            model, tok, ids, params=greedy, max_tokens=args.tokens, end_tokens=(), forward=forward
        )
        return done

    def constrained():
        processor = constraint.processor(args.tokens)
        *_, done = generate(
            model,
            tok,
            ids,
            params=greedy,
            max_tokens=args.tokens,
            forward=forward,
            logits_processors=[processor],
        )
        return done, processor

    free()
    constrained()  # compile both shapes, build the token trie
    base = min(_decode_ms(free()) for _ in range(3))
    runs = [constrained() for _ in range(3)]
    done, processor = min(runs, key=lambda r: _decode_ms(r[0]))
    steps = len(done.tokens)
    end = processor.endgame_steps
    grammar_ms = processor.mask_seconds / steps * 1000
    print(f"narrow shape, vocabulary {model.args.vocab_size}, {steps} constrained tokens")
    print(f"  decode step, free:           {base:7.2f} ms")
    print(f"  decode step, constrained:    {_decode_ms(done):7.2f} ms")
    print(
        f"  grammar work per step:       {grammar_ms:7.3f} ms ({grammar_ms / base:.1%} of a step)"
    )
    print(f"    of which {end} steps near the end of the budget (checking room to finish)")
    steady = _steady_ms(model, tok, ids, constraint, forward, args.tokens)
    print(f"  grammar work, budget far:    {steady:7.3f} ms ({steady / base:.1%} of a step)")
    print(
        f"  llguidance mask (replay):    {replay_llguidance(tok, model, done.tokens[:-1]):7.1f} us"
    )
    xg = replay_xgrammar(path, model, done.tokens[:-1])
    print("  xgrammar mask (replay):      " + ("not installed" if xg is None else f"{xg:7.1f} us"))


if __name__ == "__main__":
    main()
