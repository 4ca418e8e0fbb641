"""`apertus-mlx bench`: the JSON scripts rely on, and what counts as a graph operation."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import mlx.core as mx

from apertus_mlx.bench import compute_ops, dot_primitives, graph_primitives

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
