"""The Apertus architecture in MLX: the one forward pass.

Parameter names are the checkpoint's (after `loading.sanitize`), so loading is a dictionary
update. The forward pass reads like transformers' `modeling_apertus.py`:

    h   = x + attn(attention_layernorm(x))          attn: q/k/v -> QK-RMSNorm -> RoPE -> GQA
    out = h + down_proj(xielu(up_proj(feedforward_layernorm(h))))

The same code serves a whole sequence (no cache), a prompt chunk, one decoded token and a
block of drafted tokens to verify: with a cache it reads and writes `KVBuffers`, whose
position is an array, so `forward.Forward` can compile it once per shape. How norms, RoPE and
xIELU run (Metal kernels, `mx.fast`, or plain operations that `mx.compile` fuses on the CPU)
was decided once, in the `Plan` the modules are built with; so was whether a decoding step's
quantized projections may try our Metal kernels (`kernels/linear.py`).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from .cache import KVBuffers, KVCache
from .config import GenerationConfig, ModelArgs
from .kernels import fast_norm_rope, norm_rope, rope_tables, xielu, xielu_compiled
from .kernels.linear import projection, qkv_norm_rope, up_xielu
from .plan import Plan

XIELU_BETA = 0.5
XIELU_EPS = -1e-6


def rope_inv_freq(args: ModelArgs) -> np.ndarray:
    """Inverse RoPE frequencies (float32), llama3-scaled exactly as transformers computes them."""
    dim = args.head_dim
    inv_freq = (1.0 / (args.rope_theta ** (np.arange(0, dim, 2, dtype=np.float32) / dim))).astype(
        np.float32
    )
    s = args.rope_scaling
    if s is None:
        return inv_freq
    low_wavelen = s.original_max_position_embeddings / s.low_freq_factor
    high_wavelen = s.original_max_position_embeddings / s.high_freq_factor
    wavelen = (2 * math.pi / inv_freq).astype(np.float32)
    scaled = np.where(wavelen > low_wavelen, inv_freq / s.factor, inv_freq).astype(np.float32)
    smooth = (s.original_max_position_embeddings / wavelen - s.low_freq_factor) / (
        s.high_freq_factor - s.low_freq_factor
    )
    smoothed = (1 - smooth) * scaled / s.factor + smooth * scaled
    medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
    return np.where(medium, smoothed, scaled).astype(np.float32)


class RMSNorm(nn.Module):
    def __init__(self, dims: int, eps: float, fast: bool):
        super().__init__()
        self.weight = mx.ones((dims,))
        self.eps = eps
        self.fast = fast

    def __call__(self, x: mx.array) -> mx.array:
        if self.fast:
            return mx.fast.rms_norm(x, self.weight, self.eps)
        # As the reference: normalise in float32, cast back, then scale.
        xf = x.astype(mx.float32)
        xf = xf * mx.rsqrt(mx.mean(xf * xf, axis=-1, keepdims=True) + self.eps)
        return self.weight * xf.astype(x.dtype)


class RoPE(nn.Module):
    """Rotate-half (non-interleaved) rotary embedding from llama3-scaled inverse frequencies.

    `rotation(length, position)` is computed once per forward pass and applied to every
    layer's q and k together with their RMSNorm: on the CPU as cos/sin tables for the plain
    `norm_rope` (which `mx.compile` fuses), on Metal by our fused kernel or `mx.fast`.
    """

    def __init__(self, args: ModelArgs, plan: Plan):
        super().__init__()
        self._inv_freq = mx.array(rope_inv_freq(args))
        self._wavelengths = 1.0 / self._inv_freq  # what mx.fast.rope calls `freqs`
        self.plan = plan

    def rotation(self, length: int, position: int | mx.array) -> Rotation:
        return Rotation(self.plan, length, position, self._inv_freq, self._wavelengths)


class Rotation:
    """(x (B, L, heads, D), norm) -> normed, rotated (B, heads, L, D), for one forward pass.

    Keeps the positions and frequencies, which the fused q/k/v kernel also takes.
    """

    def __init__(
        self,
        plan: Plan,
        length: int,
        position: int | mx.array,
        inv_freq: mx.array,
        wavelengths: mx.array,
    ):
        self.plan, self.position, self.inv_freq = plan, position, inv_freq
        self.fast, self.wavelengths = plan.fast_ops, wavelengths
        if not self.fast:
            self.tables = rope_tables(length, position, inv_freq)

    def __call__(self, x: mx.array, norm: RMSNorm) -> mx.array:
        if not self.fast:
            return norm_rope(x, norm.weight, norm.eps, *self.tables)
        tables = self.position, self.inv_freq, self.wavelengths
        return fast_norm_rope(x, norm.weight, norm.eps, *tables, self.plan)


class XIELU(nn.Module):
    """xIELU with the checkpoint's learned scalars.

    a_p = softplus(alpha_p) and a_n = beta + softplus(alpha_n) are computed in the graph from
    the stored scalars rather than folded at load: the weights are inputs of the compiled
    forward, so an updated alpha is honoured like any other weight, and the two scalar
    softplus fuse into the element-wise kernel where `mx.compile` runs it.
    """

    def __init__(self, plan: Plan):
        super().__init__()
        self.plan = plan
        self.alpha_p = mx.array(math.log(math.expm1(0.8)))
        self.alpha_n = mx.array(math.log(math.expm1(0.8 - XIELU_BETA)))
        self.beta = mx.array(XIELU_BETA)
        self.eps = mx.array(XIELU_EPS)

    def constants(self) -> tuple[mx.array, mx.array, mx.array, mx.array]:
        """a_p, a_n, beta, eps as 0-d float32 arrays."""
        f32 = mx.float32
        beta, eps = self.beta.astype(f32), self.eps.astype(f32)
        a_p = nn.softplus(self.alpha_p.astype(f32))
        return a_p, beta + nn.softplus(self.alpha_n.astype(f32)), beta, eps

    def __call__(self, x: mx.array) -> mx.array:
        if self.plan.metal_kernels:  # the kernel where it checks out
            return xielu(x, *self.constants(), self.plan)
        return xielu_compiled(x, *self.constants())


class Attention(nn.Module):
    def __init__(self, args: ModelArgs, plan: Plan):
        super().__init__()
        self.n_heads = args.num_attention_heads
        self.n_kv_heads = args.num_key_value_heads
        self.head_dim = args.head_dim
        self.scale = args.head_dim**-0.5
        self.fused = plan.fuse_qkv
        dims, bias = args.hidden_size, args.attention_bias
        q_size, kv_size = self.n_heads * self.head_dim, self.n_kv_heads * self.head_dim
        if self.fused:  # one matmul instead of three: the loader concatenates them (fusion.py)
            self.qkv_proj = projection(dims, q_size + 2 * kv_size, bias, plan)
        else:
            self.q_proj = projection(dims, q_size, bias, plan)
            self.k_proj = projection(dims, kv_size, bias, plan)
            self.v_proj = projection(dims, kv_size, bias, plan)
        self.o_proj = projection(q_size, dims, bias, plan)
        self.q_norm = RMSNorm(self.head_dim, args.rms_norm_eps, plan.fast_ops)
        self.k_norm = RMSNorm(self.head_dim, args.rms_norm_eps, plan.fast_ops)

    def __call__(
        self, x: mx.array, mask: Any, kv: KVBuffers | None, layer: int, rotate: Any
    ) -> mx.array:
        B, L, _ = x.shape
        q, k, v = self.project(x, rotate)
        if kv is None:
            out = mx.fast.scaled_dot_product_attention(q, k, v, scale=self.scale, mask=mask)
        else:  # k, v stored at the pass's position; attention over every position so far
            out = kv.attend(layer, q, k, v, self.scale, mask)
        return self.o_proj(out.transpose(0, 2, 1, 3).reshape(B, L, -1))

    def project(self, x: mx.array, rotate: Rotation) -> tuple[mx.array, mx.array, mx.array]:
        """q, k, v (B, heads, L, head_dim); q and k RMS-normed per head and rotated."""
        B, L, _ = x.shape
        if self.fused:
            heads = (self.n_heads, self.n_kv_heads)
            # A decoding step on Metal: one kernel for all of it, where that checks out and wins.
            fused = qkv_norm_rope(self.qkv_proj, x, self.q_norm, self.k_norm, rotate, *heads)
            if fused is not None:
                return fused
            q_size, kv_size = self.n_heads * self.head_dim, self.n_kv_heads * self.head_dim
            qkv = self.qkv_proj(x)
            q, k, v = qkv[..., :q_size], qkv[..., q_size : q_size + kv_size], qkv[..., -kv_size:]
        else:
            q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        q = rotate(q.reshape(B, L, self.n_heads, -1), self.q_norm)
        k = rotate(k.reshape(B, L, self.n_kv_heads, -1), self.k_norm)
        return q, k, v.reshape(B, L, self.n_kv_heads, -1).transpose(0, 2, 1, 3)


class MLP(nn.Module):
    def __init__(self, args: ModelArgs, plan: Plan):
        super().__init__()
        self.up_proj = projection(args.hidden_size, args.intermediate_size, False, plan)
        self.down_proj = projection(args.intermediate_size, args.hidden_size, False, plan)
        self.act_fn = XIELU(plan)

    def __call__(self, x: mx.array) -> mx.array:
        # act_fn(up_proj(x)); one kernel on a decoding step where that checks out and wins
        return self.down_proj(up_xielu(self.up_proj, self.act_fn, x))


class DecoderLayer(nn.Module):
    def __init__(self, args: ModelArgs, plan: Plan):
        super().__init__()
        self.self_attn = Attention(args, plan)
        self.mlp = MLP(args, plan)
        self.attention_layernorm = RMSNorm(args.hidden_size, args.rms_norm_eps, plan.fast_ops)
        self.feedforward_layernorm = RMSNorm(args.hidden_size, args.rms_norm_eps, plan.fast_ops)

    def __call__(self, x, mask, kv, layer, rotate) -> mx.array:
        h = x + self.self_attn(self.attention_layernorm(x), mask, kv, layer, rotate)
        return h + self.mlp(self.feedforward_layernorm(h))


@dataclass(frozen=True)
class Part:
    """The contiguous block of layers `start` .. `stop` - 1 (of `total`) one process holds.

    A whole model is the one part of one process. Across several (`pipeline.py`), the first
    part embeds token ids and the last one ends in the final norm and the head; those in
    between take hidden states in and give hidden states out. Layers keep the checkpoint's
    numbers in the checkpoint and are numbered from 0 in the part (see `loading.localize`).
    """

    start: int
    stop: int
    total: int

    @classmethod
    def whole(cls, args: ModelArgs) -> Part:
        return cls(0, args.num_hidden_layers, args.num_hidden_layers)

    @property
    def first(self) -> bool:
        return self.start == 0

    @property
    def last(self) -> bool:
        return self.stop == self.total

    def __len__(self) -> int:
        return self.stop - self.start


class ApertusModel(nn.Module):
    def __init__(self, args: ModelArgs, plan: Plan, part: Part | None = None):
        super().__init__()
        self.part = part = part or Part.whole(args)
        if part.first or (part.last and args.tie_word_embeddings):  # a tied head reads it
            self.embed_tokens = nn.Embedding(args.vocab_size, args.hidden_size)
        self.layers = [DecoderLayer(args, plan) for _ in range(len(part))]
        if part.last:
            self.norm = RMSNorm(args.hidden_size, args.rms_norm_eps, plan.fast_ops)
        self.rope = RoPE(args, plan)
        self._dtype = plan.dtype

    def __call__(
        self,
        inputs: mx.array,
        kv: KVBuffers | None = None,
        after_layer: Callable[[mx.array], None] | None = None,
    ) -> mx.array:
        """Final hidden states (B, L, hidden) of `inputs` (B, L), after those `kv` holds.

        A part after the first takes the previous part's hidden states (B, L, hidden) as
        `inputs`; a part before the last gives its last layer's output, without the final norm.
        `after_layer(h)`, if given, sees each layer's output: reading a long prompt evaluates
        layer by layer there, so that a stop request can land between two layers.
        """
        length = inputs.shape[1]
        if kv is None:
            mask, rotate = "causal" if length > 1 else None, self.rope.rotation(length, 0)
        else:  # rows of a batch may each have their own position (`batch.RowsKV`)
            mask, rotate = kv.mask(length), kv.rotation(self.rope, length)
        h = self.embed(inputs) if self.part.first else inputs
        for i, layer in enumerate(self.layers):
            h = layer(h, mask, kv, i, rotate)
            if after_layer is not None:
                after_layer(h)
        return self.norm(h) if self.part.last else h

    def embed(self, inputs: mx.array) -> mx.array:
        """Token embeddings in the compute dtype.

        A quantized embedding dequantizes in its scales' dtype, which may be the stored one
        (bfloat16, see `loading.cast_weights`); so the looked-up rows' scales are widened first.
        """
        dtype, table = self._dtype, self.embed_tokens
        if not isinstance(table, nn.QuantizedEmbedding):
            return table(inputs).astype(dtype)
        scales, biases = table["scales"][inputs], table.get("biases")
        if mx.issubdtype(scales.dtype, mx.floating):  # affine; float formats have uint8 scales
            scales, biases = scales.astype(dtype), biases[inputs].astype(dtype)
        else:
            biases = None if biases is None else biases[inputs]
        return mx.dequantize(
            table["weight"][inputs],
            scales,
            biases,
            group_size=table.group_size,
            bits=table.bits,
            mode=table.mode,
        ).astype(dtype)


class Model(nn.Module):
    """ApertusForCausalLM: `model(input_ids, cache=None)` -> logits (batch, length, vocab).

    `part` (default: the whole model) makes it one block of a model split across processes;
    on the first process `pipeline` then runs the others (`pipeline.Pipeline`), so calling
    the model and generating from it work as they do on one process.
    """

    generation = GenerationConfig()  # the checkpoint's, set by apertus_mlx.load; none: no stops
    pipeline: Any = None  # on the first of several processes: how it drives the others

    def __init__(self, args: ModelArgs, plan: Plan, part: Part | None = None):
        super().__init__()
        self.args = args
        self.plan = plan
        self.model = ApertusModel(args, plan, part)
        if self.part.last and not args.tie_word_embeddings:
            self.lm_head = projection(args.hidden_size, args.vocab_size, False, plan)

    def __call__(self, inputs: mx.array, cache: KVCache | None = None) -> mx.array:
        """Logits of every position; with a cache, continue it (it then holds `inputs` too)."""
        if self.pipeline is not None:
            return self.pipeline.logits(inputs, cache)
        hidden = self.model(inputs) if cache is None else cache.run(self.model, inputs)
        return self.logits(hidden)

    @property
    def part(self) -> Part:
        return self.model.part

    def logits(self, hidden: mx.array) -> mx.array:
        if self.args.tie_word_embeddings:
            return self.model.embed_tokens.as_linear(hidden)
        return self.lm_head(hidden)

    @property
    def layers(self) -> list[DecoderLayer]:
        return self.model.layers

    def make_cache(self, batch: int = 1, bits: int | None = None) -> KVCache:
        """An empty KV cache; `bits` (8 or 4) stores keys and values quantized."""
        a = self.args
        return KVCache(
            len(self.layers),
            a.num_key_value_heads,
            a.head_dim,
            self.plan.cache_dtype,
            batch,
            bits=bits,
        )
