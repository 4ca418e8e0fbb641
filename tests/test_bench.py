"""`apertus-mlx bench`: the JSON scripts rely on, and what counts as a graph operation."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import mlx.core as mx
import pytest

from apertus_mlx.bench import (
    Result,
    best,
    compute_ops,
    dot_primitives,
    format_table,
    graph_primitives,
)

KEYS = {"prefill_tps", "decode_tps", "ttft_s", "peak_memory_gb", "graph_ops_per_token"}


def test_view_ops_are_not_counted():
    x = mx.ones((2, 3))
    mx.eval(x)
    y = (x.reshape(3, 2).T + 1)[:, :1] * mx.broadcast_to(mx.array(2.0), (2, 1))
    prims = graph_primitives([y])
    assert prims["Reshape"] and prims["Transpose"] and prims["Slice"] and prims["Broadcast"]
    assert compute_ops(prims) == {"Add": 1, "Multiply": 1}


def test_a_fused_kernel_counts_once():
    x = mx.ones((4,))
    mx.eval(x)
    y = mx.compile(lambda a: mx.exp(a) * 2 + 1)(x)
    ops = compute_ops(graph_primitives([y]))
    assert sum(ops.values()) == 1 and next(iter(ops)).startswith("Compiled")


def test_dot_parsing_ignores_array_nodes():
    dot = (
        'digraph {\n{ rank=source; "A"; }\n{ 1 [label ="Add", shape=rectangle]; }\n'
        '"A" -> 1\n{ "B"; }\n1 -> "B"\n{ 2 [label ="Reshape", shape=rectangle]; }\n}\n'
    )
    assert dot_primitives(dot) == {"Add": 1, "Reshape": 1}


def test_bench_json_against_mlx_lm(checkpoint):
    out = subprocess.run(
        [sys.executable, "-m", "apertus_mlx", "bench", "-m", str(checkpoint("gqa-llama3-f32"))]
        + ["--prompt-tokens", "8", "--gen-tokens", "3", "--repeats", "1", "--vs-mlx-lm", "--json"],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "PYTHONIOENCODING": "utf-8"},
    )
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout)
    assert set(result) == {"ours", "mlx_lm"}
    for engine in result.values():
        assert set(engine) == KEYS
        assert all(engine[k] > 0 for k in KEYS), engine
    # Fused q/k/v and the compiled step: fewer operations than mlx-lm's plain graph.
    assert result["ours"]["graph_ops_per_token"] < result["mlx_lm"]["graph_ops_per_token"]


METRIC_NAMES = ("prefill", "decode", "memory")


def _result(prefill: float, decode: float, memory: float) -> Result:
    return Result(prefill, decode, ttft_s=0.1, peak_memory_gb=memory, graph_ops_per_token=1)


def test_best_takes_each_metric_at_its_best_and_says_how_far_the_worst_run_was():
    r = best([_result(100, 10, 1.2), _result(80, 12, 1.0)])
    assert (r.prefill_tps, r.decode_tps, r.peak_memory_gb) == (100, 12, 1.0)
    assert r.spread["prefill_tps"] == pytest.approx(0.2)  # 80 is 20% below 100
    assert r.spread["decode_tps"] == pytest.approx(2 / 12)
    assert r.spread["peak_memory_gb"] == pytest.approx(0.2)


def test_the_table_marks_a_row_behind_mlx_lm_and_says_when_it_is_within_the_spread():
    ours = best([_result(90, 10, 1.1), _result(89, 10, 1.1)])  # prefill behind by 10%
    theirs = best([_result(100, 9, 1.0), _result(70, 9, 1.0)])  # their runs 30% apart
    lines = format_table({"m": {"ours": ours, "mlx_lm": theirs}}).splitlines()
    rows = {name: next(line for line in lines if name in line) for name in METRIC_NAMES}
    assert rows["prefill"].endswith("✗ (within spread)") and "0.90" in rows["prefill"]
    assert "✗" not in rows["decode"] and "1.11" in rows["decode"]
    assert rows["memory"].endswith("1.10  ✗")  # more memory, and the runs agree
