"""What the output filter costs: load time of a 1M-entry filter and microseconds per token.

    python -m benchmarks.filter_bench            # 1,000,000 entries, max_words 4
    python -m benchmarks.filter_bench --entries 100000 --json
    python -m benchmarks.filter_bench --entries 1000 --patterns 4   # local patterns (RE2)

Builds a filter of random digests (plus a few real phrases so matches happen), installs it
in the compiled form under a temporary directory, and streams a long answer through it in
token-sized chunks. Decode on the 0.5B shape takes ~400 ms per token on 2 CPU cores; the
filter's share of that is printed too.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import tempfile
import time
from pathlib import Path

from apertus_mlx.filter_format import parse_json, read_filter, write_compiled
from apertus_mlx.output_filter import OutputFilter, phrase_digest

DECODE_MS_PER_TOKEN = 400.0  # 0.5B shape, CPU backend, this machine class
# Local patterns as a user might write them (e-mail, Swiss phone, IBAN, AHV number); the last
# backtracks exponentially in Python's `re` and costs what any pattern costs in RE2.
PATTERNS = [
    r"[\w.+-]+@[\w-]+\.[a-z]{2,}",
    r"\+41(?: ?\d){9}\b",
    r"(?i)CH\d{2}(?: ?[0-9A-Z]{4}){4}",
    r"756\.\d{4}\.\d{4}\.\d{2}",
    r"(\w+\s?)+@",
]
WORDS = [
    "the",
    "of",
    "Zürich",
    "Anna",
    "Muster",
    "lives",
    "in",
    "a",
    "house",
    "near",
    "lake",
    "and",
    "works",
    "as",
    "an",
    "engineer",
]


def answer(n_words: int, seed: int = 0) -> list[str]:
    """Token-sized chunks of a plausible answer (~4 characters each, like a BPE stream)."""
    rng = random.Random(seed)
    text = " ".join(rng.choice(WORDS) + rng.choice(["", "", ",", "."]) for _ in range(n_words))
    chunks, i = [], 0
    while i < len(text):
        step = rng.randint(1, 6)
        chunks.append(text[i : i + step])
        i += step
    return chunks


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--entries", type=int, default=1_000_000)
    p.add_argument("--max-words", type=int, default=4)
    p.add_argument("--words", type=int, default=20_000, help="length of the streamed answer")
    p.add_argument("--patterns", type=int, default=0, help=f"local patterns, 0-{len(PATTERNS)}")
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)

    with tempfile.TemporaryDirectory() as tmp:
        src, installed = Path(tmp) / "filter.json", Path(tmp) / "output-filter.bin"
        entries = [os.urandom(32).hex() for _ in range(args.entries - 2)]
        entries += [phrase_digest("Anna Muster"), phrase_digest("Zürich")]
        doc = {
            "version": "bench",
            "published": "2026-01-01",
            "algorithm": "sha256",
            "normalization": "nfkc-casefold-words",
            "max_words": args.max_words,
            "entries": entries,
            "patterns": PATTERNS[: args.patterns],
        }
        src.write_text(json.dumps(doc))
        t0 = time.perf_counter()
        data = parse_json(src.read_bytes(), str(src))
        json_s = time.perf_counter() - t0
        write_compiled(data, installed)
        t0 = time.perf_counter()
        f = OutputFilter(read_filter(installed))
        load_s = time.perf_counter() - t0

    chunks = answer(args.words)
    s = f.stream()
    t0 = time.perf_counter()
    out = [s.feed(c) for c in chunks]
    out.append(s.flush())
    per_token_us = (time.perf_counter() - t0) / len(chunks) * 1e6
    result = {
        "entries": data.entries,
        "max_words": args.max_words,
        "patterns": args.patterns,
        "json_parse_s": round(json_s, 3),
        "installed_load_s": round(load_s, 4),
        "tokens": len(chunks),
        "removed": s.removed,
        "us_per_token": round(per_token_us, 2),
        "share_of_decode_pct": round(per_token_us / (DECODE_MS_PER_TOKEN * 1e3) * 100, 4),
    }
    if args.json:
        print(json.dumps(result))
        return
    print(
        f"filter of {data.entries:,} entries, max_words {args.max_words}, "
        f"{args.patterns} local patterns"
    )
    print(f"  validate + sort the published JSON (filter install): {json_s:.2f} s")
    print(f"  load the installed filter (each generate / chat):    {load_s * 1e3:.1f} ms")
    print(
        f"  streaming: {per_token_us:.1f} µs/token over {len(chunks):,} tokens "
        f"({result['share_of_decode_pct']:.3f}% of a {DECODE_MS_PER_TOKEN:.0f} ms decode step), "
        f"{s.removed} matches removed"
    )


if __name__ == "__main__":
    main()
