"""The decode step as one compiled graph.

Decoding one token runs every layer on a single position, so its cost on small models is
dispatching operations, not arithmetic. Here the whole step (embedding, every layer, head)
is one `mx.compile`d function over the KV cache's fixed-size buffers: the new key and value
are written with `mx.slice_update` at an offset that is an input, and attention masks the
unused tail, so the graph's shapes change only when the cache grows a bucket, and MLX fuses
the element-wise work (norms, RoPE, xIELU, residuals) into few kernels.

The plain path (`generate.DecodeStep`) stays the reference; tests compare the two.
"""

from __future__ import annotations

import mlx.core as mx

from .cache import KVCache


class CompiledDecodeStep:
    def __init__(self, model):
        self.model = model
        self._compiled = mx.compile(self._step)

    def prefill(self, ids: mx.array, cache: KVCache) -> mx.array:
        hidden = self.model.model(ids, cache)
        return self.model.logits(hidden[:, -1, :])

    def __call__(self, token: mx.array, cache: KVCache) -> mx.array:
        cache.reserve(cache.offset + 1)
        offset = mx.array([cache.offset], dtype=mx.int32)
        logits, *buffers = self._compiled(token.reshape(1, 1), offset, *cache.keys, *cache.values)
        n = cache.num_layers
        cache.keys, cache.values = list(buffers[:n]), list(buffers[n:])
        cache.advance(1)
        return logits

    def _step(self, token: mx.array, offset: mx.array, *buffers: mx.array) -> list[mx.array]:
        model = self.model
        n = len(model.layers)
        keys, values = list(buffers[:n]), list(buffers[n:])
        capacity = keys[0].shape[2]
        mask = (mx.arange(capacity) <= offset)[None, None, None, :]  # (1, 1, 1, capacity)
        rotation = model.model.rope(1, offset[0])
        x = model.model.embed(token)
        for i, layer in enumerate(model.layers):
            attn = layer.self_attn
            q, k, v = attn.heads(layer.attention_layernorm(x), rotation)
            keys[i] = mx.slice_update(keys[i], k, offset, axes=(2,))
            values[i] = mx.slice_update(values[i], v, offset, axes=(2,))
            h = x + attn.attend(q, keys[i], values[i], mask)
            x = h + layer.mlp(layer.feedforward_layernorm(h))
        logits = model.logits(model.model.norm(x)[:, -1, :])
        return [logits, *keys, *values]
