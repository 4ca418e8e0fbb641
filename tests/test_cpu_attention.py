"""`cache.cpu_attention`: on the CPU it must be `mx.fast.scaled_dot_product_attention` bit for
bit (a cache's answers do not change with it), for every mask the model passes."""

from __future__ import annotations

import mlx.core as mx
import pytest

from apertus_mlx.cache import PlainBuffers, cpu_attention


def inputs(dtype, batch: int, heads: int, kv_heads: int, length: int, positions: int):
    mx.random.seed(batch * 100 + length)
    q = mx.random.normal((batch, heads, length, 16)) * 3
    k = mx.random.normal((batch, kv_heads, positions, 16)) * 3
    v = mx.random.normal((batch, kv_heads, positions, 16))
    return q.astype(dtype), k.astype(dtype), v.astype(dtype)


def masks(dtype, batch: int, heads: int, length: int, positions: int) -> list:
    ends = mx.arange(positions - length - batch + 1, positions - length + 1)  # one per row
    last = ends[:, None] + mx.arange(length)[None, :]  # (batch, length)
    seen = mx.arange(positions)[None, None, :] <= last[:, :, None]  # (batch, length, positions)
    per_head = mx.broadcast_to(seen[:, None], (batch, heads, length, positions))
    cut = per_head & (mx.arange(heads) % 2 == 0)[None, :, None, None] | (mx.arange(positions) == 0)
    return [
        None,
        "causal",
        seen[0],  # (length, positions), as a single cache's pass gives it
        seen[:, None],  # (batch, 1, length, positions), as a batched step gives it
        cut,  # (batch, heads, length, positions)
        mx.where(seen[:, None], 0.0, -1e4).astype(dtype),  # additive
    ]


@pytest.mark.parametrize("dtype", [mx.bfloat16, mx.float16, mx.float32])
@pytest.mark.parametrize(
    "batch,heads,kv_heads,length,positions",
    [(1, 4, 1, 1, 64), (3, 4, 1, 1, 256), (1, 8, 2, 37, 101), (2, 4, 4, 5, 64), (1, 4, 2, 64, 64)],
)
def test_equals_the_fused_attention_bit_for_bit(dtype, batch, heads, kv_heads, length, positions):
    q, k, v = inputs(dtype, batch, heads, kv_heads, length, positions)
    with mx.stream(mx.cpu):
        for mask in masks(dtype, batch, heads, length, positions):
            expected = mx.fast.scaled_dot_product_attention(q, k, v, scale=0.25, mask=mask)
            got = cpu_attention(q, k, v, 0.25, mask)
            assert got.dtype == expected.dtype and got.shape == expected.shape
            assert mx.array_equal(got, expected).item(), (
                dtype,
                mask if isinstance(mask, str) else mask.shape,
            )


def test_plain_buffers_take_it_for_16_bit_inputs_on_the_cpu(monkeypatch):
    import apertus_mlx.cache as cache

    calls = []
    monkeypatch.setattr(cache, "cpu_attention", lambda *a: calls.append(a) or a[0])
    layout = PlainBuffers()
    for dtype in (mx.bfloat16, mx.float32):
        q, k, v = inputs(dtype, 1, 4, 1, 1, 64)
        with mx.stream(mx.cpu):
            layout.attention(q, (k,), (v,), 0.25, None)
    assert len(calls) == 1 and calls[0][0].dtype == mx.bfloat16
