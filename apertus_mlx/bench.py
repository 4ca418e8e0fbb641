"""Speed side by side with mlx-lm: same checkpoint, same random prompt, same token count.

Each engine runs greedy decoding of a fixed number of tokens (EOS ignored) from a freshly
loaded model, after a short warm-up (a 1-token prefill and one decode step: the first call of
our compiled step traces and compiles, which is a once-per-model cost, not decode speed).
Runs alternate between the engines, and the model is unloaded between runs, so peak memory
is per run and neither engine profits from the other's caches. Of several runs each metric
reports its best (highest tok/s, lowest time to first token and memory): noise on a shared
machine only ever slows a run down.

Graph operations per token count the primitives of one decode step's graph as
`mx.export_to_dot` writes it for the step's outputs (logits and updated KV buffers).
View-only primitives (reshape, slice, transpose, broadcast, ...) are left out: they move no
data. A node fused by `mx.compile` (label `Compiled...`) counts once: it runs as one kernel.
"""

from __future__ import annotations

import gc
import os
import re
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import mlx.core as mx
import numpy as np

VIEW_OPS = frozenset(
    {
        "AsStrided",
        "Broadcast",
        "BroadcastAxes",
        "ExpandDims",
        "Flatten",
        "Reshape",
        "Slice",
        "Squeeze",
        "Transpose",
        "Unflatten",
        "View",
    }
)
WARMUP_TOKENS = 1  # enough to compile our decode step; cheap for mlx-lm's slow INT-n
_NODE = re.compile(r'^\{ \S+ \[label ="([^"]+)", shape=rectangle\]; \}$', re.MULTILINE)


@dataclass
class Result:
    prefill_tps: float
    decode_tps: float
    ttft_s: float
    peak_memory_gb: float
    graph_ops_per_token: int
    ops: dict[str, int] = field(default_factory=dict, repr=False)  # primitive -> count
    # metric -> (worst - best) / best over the runs: how far apart alternating runs landed
    spread: dict[str, float] = field(default_factory=dict)

    def as_dict(self, detailed: bool = False) -> dict:
        """The metrics; `detailed` adds per-primitive op counts and the runs' spread."""
        d = asdict(self)
        if not detailed:
            del d["ops"], d["spread"]
        return d


def dot_primitives(dot: str) -> Counter[str]:
    """Primitive name -> how many nodes of it, from `mx.export_to_dot` text."""
    return Counter(_NODE.findall(dot))


def compute_ops(primitives: Counter[str]) -> Counter[str]:
    """The primitives that do work: everything but view-only ones."""
    return Counter({k: n for k, n in primitives.items() if k not in VIEW_OPS})


def graph_primitives(outputs: Sequence[mx.array]) -> Counter[str]:
    """Primitives in the (unevaluated) graph behind `outputs`."""
    fd, name = tempfile.mkstemp(suffix=".dot")
    os.close(fd)
    try:
        mx.export_to_dot(name, *outputs)
        return dot_primitives(Path(name).read_text())
    finally:
        os.unlink(name)


def random_prompt(n: int, vocab_size: int, seed: int = 0) -> list[int]:
    """n token ids, the same for every engine and run; ids below 4 (specials) avoided."""
    return np.random.default_rng(seed).integers(4, vocab_size, size=n).tolist()


def unload() -> None:
    """Drop what the last run left, so the next run's peak memory is its own."""
    gc.collect()
    mx.synchronize()
    mx.clear_cache()


def ours_step_ops(forward, prompt: list[int], gen_tokens: int) -> Counter[str]:
    """Warm up our compiled forward and return the primitives of one decode step's graph."""
    model = forward.model
    cache = model.make_cache()
    # The measured run's decode steps have this capacity (see `generate_step`): compile for
    # the same shapes.
    cache.reserve(len(prompt) + 1, most=len(prompt) + gen_tokens)
    logits = forward.prefill(prompt[:WARMUP_TOKENS], cache)
    y = mx.argmax(logits, axis=-1)
    mx.eval(y, *cache.arrays())
    logits = forward(y[:, None], cache)
    prims = graph_primitives([logits, *cache.arrays()])
    mx.eval(logits, *cache.arrays())
    return prims


def bench_ours(path: str | Path, prompt: list[int], gen_tokens: int) -> Result:
    """Load with apertus-mlx, warm up, then time `generate_step` (greedy), as for mlx-lm."""
    from .forward import Forward
    from .generate import generate_step
    from .loading import load_model
    from .sampling import SamplingParams, make_sampler

    forward = Forward(load_model(path))
    prims = ours_step_ops(forward, prompt, gen_tokens)
    unload()
    steps = generate_step(
        prompt,
        forward,
        forward.model.make_cache(),
        sampler=make_sampler(SamplingParams(temperature=0)),
        max_tokens=gen_tokens,
    )
    return time_steps(steps, len(prompt), gen_tokens, prims, "apertus-mlx")


def time_steps(
    steps: Iterator, prompt_tokens: int, gen_tokens: int, prims: Counter[str], engine: str
) -> Result:
    """Run a token generator (ours or mlx-lm's `generate_step`) to the end and time it."""
    mx.reset_peak_memory()
    start = time.perf_counter()
    first = start
    n = 0
    for n, _ in enumerate(steps, 1):
        if n == 1:
            first = time.perf_counter()
    end = time.perf_counter()
    mx.synchronize()  # a step queued past the last token must not count as the next run's
    if n != gen_tokens:
        raise RuntimeError(f"{engine} generated {n} tokens instead of {gen_tokens}")
    ttft = first - start
    ops = compute_ops(prims)
    return Result(
        prefill_tps=prompt_tokens / max(ttft, 1e-9),
        decode_tps=(n - 1) / max(end - first, 1e-9) if n > 1 else 0.0,
        ttft_s=ttft,
        peak_memory_gb=mx.get_peak_memory() / 1e9,
        graph_ops_per_token=sum(ops.values()),
        ops=dict(ops),
    )


def _arrays(cache: list) -> list[mx.array]:
    """The arrays of an mlx-lm cache's state (which also holds plain ints)."""
    return [a for c in cache for a in c.state if isinstance(a, mx.array)]


def mlx_lm_step_ops(model, prompt: list[int]) -> Counter[str]:
    """Warm up mlx-lm's model and return the primitives of one decode step's graph."""
    from mlx_lm.models.cache import make_prompt_cache

    cache = make_prompt_cache(model)
    logits = model(mx.array([prompt[:WARMUP_TOKENS]]), cache=cache)
    y = mx.argmax(logits[:, -1, :], axis=-1)
    mx.eval(y, *_arrays(cache))
    logits = model(y[None], cache=cache)
    state = _arrays(cache)
    prims = graph_primitives([logits, *state])
    mx.eval(logits, *state)
    return prims


def bench_mlx_lm(path: str | Path, prompt: list[int], gen_tokens: int) -> Result:
    """Load with mlx-lm, warm up, then time its `generate_step` (greedy by default)."""
    from mlx_lm.generate import generate_step
    from mlx_lm.utils import load_model as lm_load

    model, _ = lm_load(Path(path))
    prims = mlx_lm_step_ops(model, prompt)
    unload()
    steps = generate_step(mx.array(prompt), model, max_tokens=gen_tokens)
    return time_steps(steps, len(prompt), gen_tokens, prims, "mlx-lm")


def best(results: Sequence[Result]) -> Result:
    """Each metric at its best over the runs (graph ops are the same in every run), with how
    far the worst run was from it."""
    picked, spread = {}, {}
    for _, key, _, higher_is_better in METRICS:
        if key == "graph_ops_per_token":
            continue
        values = [getattr(r, key) for r in results]
        top, bottom = (max(values), min(values)) if higher_is_better else (min(values), max(values))
        picked[key] = top
        spread[key] = abs(bottom - top) / top if top else 0.0
    return Result(
        **picked,
        graph_ops_per_token=results[0].graph_ops_per_token,
        ops=results[0].ops,
        spread=spread,
    )


def vocab_size(path: str | Path) -> int:
    from .config import ModelArgs

    return ModelArgs.from_dir(path).vocab_size


def run(
    path: str | Path,
    prompt_tokens: int,
    gen_tokens: int,
    repeats: int = 2,
    vs_mlx_lm: bool = False,
    progress: Callable[[str], None] | None = None,
) -> dict[str, Result]:
    """Alternate ours and mlx-lm `repeats` times; {"ours": best, "mlx_lm": best}."""
    prompt = random_prompt(prompt_tokens, vocab_size(path))
    engines: dict[str, Callable[[str | Path, list[int], int], Result]] = {"ours": bench_ours}
    if vs_mlx_lm:
        engines["mlx_lm"] = bench_mlx_lm
    runs: dict[str, list[Result]] = {name: [] for name in engines}
    for i in range(repeats):
        for name, fn in engines.items():
            result = fn(path, prompt, gen_tokens)
            unload()
            runs[name].append(result)
            if progress:
                progress(
                    f"{name} run {i + 1}/{repeats}: prefill {result.prefill_tps:.1f} tok/s, "
                    f"decode {result.decode_tps:.2f} tok/s"
                )
    return {name: best(rs) for name, rs in runs.items()}


# (label, Result field, format, higher is better)
METRICS = [
    ("prefill tok/s", "prefill_tps", "{:.1f}", True),
    ("decode tok/s", "decode_tps", "{:.2f}", True),
    ("TTFT s", "ttft_s", "{:.3f}", False),
    ("peak memory GB", "peak_memory_gb", "{:.2f}", False),
    ("graph ops/token", "graph_ops_per_token", "{:d}", False),
]
# The rows the contract holds us to: never slower, never more memory than mlx-lm.
CONTRACT = {"prefill_tps", "decode_tps", "peak_memory_gb"}


def verdict(key: str, ours: Result, theirs: Result) -> str:
    """ "✗" on a contract row where we are behind mlx-lm; "(within spread)" when the gap is no
    larger than how far our own runs or theirs were apart."""
    if key not in CONTRACT:
        return ""
    a, b = getattr(ours, key), getattr(theirs, key)
    higher = next(h for _, k, _, h in METRICS if k == key)
    behind = a < b if higher else a > b
    if not behind:
        return ""
    gap = abs(a - b) / b if b else float("inf")
    noise = max(ours.spread.get(key, 0.0), theirs.spread.get(key, 0.0))
    return "✗ (within spread)" if gap <= noise else "✗"


def format_table(results: dict[str, dict[str, Result]]) -> str:
    """One block of rows per model: each metric for ours and mlx-lm (with the spread of the
    runs), their ratio, and a mark where we are behind."""
    header = ["model", "metric", "ours", "mlx-lm", "ours/mlx-lm", ""]
    rows = []
    for label, engines in results.items():
        ours, theirs = engines.get("ours"), engines.get("mlx_lm")
        for i, (metric, key, fmt, _) in enumerate(METRICS):
            cells = [label if i == 0 else "", metric]
            for r in (ours, theirs):
                value = getattr(r, key) if r else None
                text = fmt.format(value) if value is not None else "-"
                if r and r.spread.get(key):
                    text += f" ±{100 * r.spread[key]:.0f}%"
                cells.append(text)
            a = getattr(ours, key) if ours else None
            b = getattr(theirs, key) if theirs else None
            cells.append(f"{a / b:.2f}" if a is not None and b else "-")
            cells.append(verdict(key, ours, theirs) if ours and theirs else "")
            rows.append(cells)
    widths = [max(len(r[c]) for r in [header, *rows]) for c in range(len(header))]
    lines = []
    for j, r in enumerate([header, *rows]):
        if j > 1 and r[0]:
            lines.append("")
        cells = [r[0].ljust(widths[0]), r[1].ljust(widths[1])]
        cells += [v.rjust(w) for v, w in zip(r[2:5], widths[2:5])]
        cells.append(r[5])
        lines.append("  ".join(cells).rstrip())
    lines.insert(1, "-" * max(len(line) for line in lines))
    return "\n".join(lines)


@dataclass
class SpeculativeResult:
    """Greedy decode speed without and with a draft model, and the draft's acceptance."""

    num_draft_tokens: int
    plain_tps: float
    speculative_tps: float
    acceptance_rate: float

    @property
    def speedup(self) -> float:
        return self.speculative_tps / max(self.plain_tps, 1e-9)


def _decode_tps(steps: Iterator[tuple[int, mx.array]], gen_tokens: int) -> float:
    """Tokens/s from the first token to the last: prompt reading left out."""
    first = time.perf_counter()
    n = 0
    for n, _ in enumerate(steps, 1):
        if n == 1:
            first = time.perf_counter()
    end = time.perf_counter()
    if n != gen_tokens:
        raise RuntimeError(f"generated {n} tokens instead of {gen_tokens}")
    return (n - 1) / max(end - first, 1e-9)


def bench_speculative(
    model, draft_model, prompt: list[int], gen_tokens: int, num_draft_tokens: int, repeats: int = 2
) -> SpeculativeResult:
    """Greedy decoding of `gen_tokens` with and without `draft_model`, alternating, best run.

    A first run of each, untimed, compiles every shape the timed ones use (the verification
    block, the draft's one- and two-token steps, the shorter last rounds).
    """
    from .forward import Forward
    from .generate import generate_step
    from .sampling import SamplingParams, make_sampler
    from .speculative import Draft, DraftCounts, speculative_generate_step

    greedy = SamplingParams(temperature=0)
    forward = Forward(model)  # compiled by the untimed first run, for all the others

    def plain() -> Iterator[tuple[int, mx.array]]:
        sampler = make_sampler(greedy)
        cache = model.make_cache()
        return generate_step(prompt, forward, cache, sampler=sampler, max_tokens=gen_tokens)

    draft = Draft(draft_model, num_draft_tokens)

    def speculative(counts: DraftCounts) -> Iterator[tuple[int, mx.array]]:
        draft.cache = draft_model.make_cache()  # a cold start, compiled graphs
        return speculative_generate_step(
            prompt,
            forward,
            model.make_cache(),
            draft,
            params=greedy,
            max_tokens=gen_tokens,
            counts=counts,
        )

    plain_runs, spec_runs, counts = [], [], DraftCounts()
    for _ in range(repeats + 1):
        plain_runs.append(_decode_tps(plain(), gen_tokens))
        counts = DraftCounts()
        spec_runs.append(_decode_tps(speculative(counts), gen_tokens))
        unload()
    return SpeculativeResult(
        num_draft_tokens=num_draft_tokens,
        plain_tps=max(plain_runs[1:]),
        speculative_tps=max(spec_runs[1:]),
        acceptance_rate=counts.accepted / max(counts.drafted, 1),
    )
