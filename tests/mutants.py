"""`make mutants`: how many realistic one-line bugs the tests catch.

Each mutant below is a small bug of the kind that once slipped past the suite: a piece of
code (text that must occur exactly once in its file) replaced by a wrong version. Each one
is applied to its own temporary copy of the repository and the tests named with it run
against that copy, stopping at the first failure: a failure catches the mutant, a pass
misses it. A mutant whose text is no longer in the code (the code was rewritten) is listed
as stale: update it to the new code rather than dropping it. Each selection of tests first
runs once on the unchanged code and must pass, so that a catch means the mutant was seen.

    python -m tests.mutants            # all of them (ten minutes or so)
    python -m tests.mutants top-p gqa  # those whose names contain any of these words

Hand-written because the mutation tools on PyPI generate mutants by the thousand and run the
whole suite against each; this list is short, chosen, and kept with the tests.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class Mutant:
    name: str
    path: str
    old: str
    new: str
    tests: tuple[str, ...]


SAMPLING = ("tests/test_sampling.py",)
SPECULATIVE = ("tests/test_speculative.py", "-k", "rejection or end_to_end or compared")

MUTANTS = [
    Mutant(
        "gqa-tiled-in-quantized-attention",
        "apertus_mlx/cache.py",
        "q = (q * scale).reshape(B, kv_heads, heads // kv_heads, L, D)",
        "q = (q * scale).reshape(B, heads // kv_heads, kv_heads, L, D).swapaxes(1, 2)",
        ("tests/test_kv_quant.py",),
    ),
    Mutant(
        "top-p-never-reaches-p",
        "apertus_mlx/sampling.py",
        "keep = (mx.cumsum(probs, axis=-1) - probs) < top_p",
        "keep = mx.cumsum(probs, axis=-1) < top_p",
        SAMPLING,
    ),
    Mutant(
        "top-p-not-renormalised-after-top-k",
        "apertus_mlx/sampling.py",
        "probs = mx.softmax(ordered, axis=-1)",
        "probs = mx.exp(ordered)",
        SAMPLING,
    ),
    Mutant(
        "min-p-from-the-top-probability-squared",
        "apertus_mlx/sampling.py",
        "threshold = mx.max(logprobs, axis=-1, keepdims=True) + mx.log(mx.array(min_p))",
        "threshold = 2 * mx.max(logprobs, axis=-1, keepdims=True) + mx.log(mx.array(min_p))",
        SAMPLING,
    ),
    Mutant(
        "top-k-keeps-one-less",
        "apertus_mlx/sampling.py",
        "return mx.where(logprobs >= kth, logprobs, -mx.inf)",
        "return mx.where(logprobs > kth, logprobs, -mx.inf)",
        SAMPLING,
    ),
    Mutant(
        "temperature-multiplies",
        "apertus_mlx/sampling.py",
        "logprobs = logprobs / p.temperature",
        "logprobs = logprobs * p.temperature",
        SAMPLING,
    ),
    Mutant(
        "repetition-penalty-inverted",
        "apertus_mlx/sampling.py",
        "selected = mx.where(selected < 0, selected * penalty, selected / penalty)",
        "selected = mx.where(selected < 0, selected / penalty, selected * penalty)",
        SAMPLING,
    ),
    Mutant(
        "seed-ignored",
        "apertus_mlx/sampling.py",
        "key = [mx.random.key(p.seed)] if p.seed is not None else None",
        "key = None",
        ("tests/test_generate.py", "-k", "seed"),
    ),
    Mutant(
        "speculative-residual-reversed",
        "apertus_mlx/speculative.py",
        "residual = mx.maximum(mx.exp(p[..., :k, :]) - mx.exp(q), 0.0)",
        "residual = mx.maximum(mx.exp(q) - mx.exp(p[..., :k, :]), 0.0)",
        SPECULATIVE,
    ),
    Mutant(
        "speculative-acceptance-ratio-inverted",
        "apertus_mlx/speculative.py",
        "accepted = uniforms < mx.exp(p_x - q_x)",
        "accepted = uniforms < mx.exp(q_x - p_x)",
        SPECULATIVE,
    ),
    Mutant(
        "detokenizer-not-finalized",
        "apertus_mlx/generate.py",
        "tail, _ = stops.feed(detok.finalize())",
        'tail, _ = stops.feed("")',
        ("tests/test_generate.py",),
    ),
    Mutant(
        "download-fetches-everything-again",
        "apertus_mlx/hub.py",
        "return Path(snapshot_download(repo, allow_patterns=ALLOW_PATTERNS, **kwargs))",
        "return Path(snapshot_download(repo, allow_patterns=ALLOW_PATTERNS, force_download=True,"
        " **kwargs))",
        ("tests/test_hub_download.py",),
    ),
    Mutant(
        "chat-never-reloads-a-replaced-filter",
        "apertus_mlx/output_filter.py",
        "if self._loaded is None or self._loaded[0] != stamp:",
        "if self._loaded is None:",
        ("tests/test_app.py", "-k", "output_filter"),
    ),
    Mutant(
        "cache-grown-chunk-by-chunk",
        "apertus_mlx/generate.py",
        "cache.reserve(len(prompt) + 1, most=len(prompt) + max_tokens)",
        "cache.reserve(len(prompt) + 1)",
        ("tests/test_generate.py", "-k", "reserved"),
    ),
    Mutant(
        "bench-gap-never-within-the-spread",
        "apertus_mlx/bench.py",
        'return "✗ (within spread)" if gap <= noise else "✗"',
        'return "✗ (within spread)" if gap < 0 else "✗"',
        ("tests/test_bench.py",),
    ),
    Mutant(
        "template-tojson-escapes-html",
        "apertus_mlx/chat_template.py",
        'env.filters["tojson"] = _tojson',
        "pass",
        ("tests/test_chat_template.py",),
    ),
    Mutant(
        "search-takes-operators",
        "apertus_mlx/store.py",
        """return " ".join('"' + word.replace('"', '""') + '"' for word in words)""",
        """return " ".join('"' + word + '"' for word in words)""",
        ("tests/test_store.py", "-k", "search"),
    ),
    Mutant(
        "answer-flushed-every-four-seconds",
        "apertus_mlx/store.py",
        "while not self._stop.wait(self.interval):",
        "while not self._stop.wait(self.interval * 4):",
        ("tests/test_store.py", "-k", "flushed"),
    ),
]


def copy_repository(dest: Path) -> None:
    """The files git knows (tracked, and new ones not ignored), as they are on disk."""
    listed = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"],
        cwd=ROOT,
        capture_output=True,
        check=True,
    ).stdout.decode()
    for name in filter(None, listed.split("\0")):
        source = ROOT / name
        if source.is_file():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, dest / name)


def environment(copy: Path, shims: Path) -> dict[str, str]:
    """Imports resolve to the copy: `apertus_mlx` from its root, and the app package (installed
    under another name, `apertus_mlx_app`) through a link to its `app/`."""
    (shims / "apertus_mlx_app").symlink_to(copy / "app", target_is_directory=True)
    path = os.pathsep.join([str(copy), str(shims)])
    return {**os.environ, "PYTHONPATH": path, "PYTHONDONTWRITEBYTECODE": "1"}


def check_imports(copy: Path, env: dict[str, str]) -> None:
    code = "import apertus_mlx as a, apertus_mlx_app as b; print(a.__file__, b.__file__)"
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=copy, env=env, capture_output=True, text=True, check=True
    ).stdout.split()
    if not all(Path(f).resolve().is_relative_to(copy.resolve()) for f in out):
        raise SystemExit(f"the copy is not what gets imported: {out}")


def run(mutant: Mutant, workdir: Path) -> tuple[str, float]:
    """'caught', 'missed' or 'stale' (the code it changes is gone), and the seconds taken. The
    mutant "none" changes nothing: its tests must pass (a control)."""
    start = time.monotonic()
    copy, shims = workdir / "repo", workdir / "shims"
    copy.mkdir()
    shims.mkdir()
    copy_repository(copy)
    if mutant.name != "none":
        target = copy / mutant.path
        text = target.read_text(encoding="utf-8")
        if text.count(mutant.old) != 1:
            return "stale", time.monotonic() - start
        target.write_text(text.replace(mutant.old, mutant.new), encoding="utf-8")
    env = environment(copy, shims)
    check_imports(copy, env)
    tests = subprocess.run(
        [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", *mutant.tests],
        cwd=copy,
        env=env,
        capture_output=True,
        text=True,
    )
    if tests.returncode not in (0, 1):  # 0: all passed, 1: some failed; else pytest broke
        raise SystemExit(f"{mutant.name}: pytest exited {tests.returncode}\n{tests.stdout}")
    return ("missed" if tests.returncode == 0 else "caught"), time.monotonic() - start


def main(words: list[str]) -> int:
    chosen = [m for m in MUTANTS if not words or any(w in m.name for w in words)]
    # First each selection of tests on the code as it is: a failure there would count as a catch.
    for tests in dict.fromkeys(m.tests for m in chosen):
        with tempfile.TemporaryDirectory(prefix="apertus-mlx-mutant-") as tmp:
            outcome, seconds = run(Mutant("none", "", "", "", tests), Path(tmp))
        print(f"{'control':7} {' '.join(tests):42} {seconds:5.0f} s", flush=True)
        if outcome != "missed":
            raise SystemExit(f"{' '.join(tests)} fail without a mutant: fix them first")
    results = []
    for mutant in chosen:
        with tempfile.TemporaryDirectory(prefix="apertus-mlx-mutant-") as tmp:
            outcome, seconds = run(mutant, Path(tmp))
        results.append(outcome)
        print(f"{outcome:7} {mutant.name:42} {seconds:5.0f} s", flush=True)
    live = [r for r in results if r != "stale"]
    caught = live.count("caught")
    print(f"caught {caught} of {len(live)} mutants ({100 * caught / max(len(live), 1):.0f}%)"
          + (f"; {results.count('stale')} stale" if "stale" in results else ""))  # fmt: skip
    return 0 if caught == len(live) and "stale" not in results else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
