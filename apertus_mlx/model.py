"""The Apertus architecture in MLX.

Parameter names are the checkpoint's names, so loading is a dictionary update. The forward
pass reads like transformers' `modeling_apertus.py`:

    h   = x + attn(attention_layernorm(x))          attn: q/k/v -> QK-RMSNorm -> RoPE -> GQA
    out = h + down_proj(xielu(up_proj(feedforward_layernorm(h))))

`fast_ops` picks, per backend, how RMSNorm and RoPE run: `mx.fast` kernels (one Metal kernel
each) or plain operations, which `mx.compile` fuses into neighbouring work on the CPU.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from .cache import KVCache
from .config import GenerationConfig, ModelArgs
from .kernels import norm_rope, qk_norm_rope, qk_rope_kernel_usable, rope_tables, xielu

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


def rms_norm(x: mx.array, weight: mx.array, eps: float, fast: bool) -> mx.array:
    if fast:
        return mx.fast.rms_norm(x, weight, eps)
    # As the reference: normalise in float32, cast back, then scale.
    xf = x.astype(mx.float32)
    xf = xf * mx.rsqrt(mx.mean(xf * xf, axis=-1, keepdims=True) + eps)
    return weight * xf.astype(x.dtype)


class RMSNorm(nn.Module):
    def __init__(self, dims: int, eps: float):
        super().__init__()
        self.weight = mx.ones((dims,))
        self.eps = eps
        self.fast = False

    def __call__(self, x: mx.array) -> mx.array:
        return rms_norm(x, self.weight, self.eps, self.fast)


class Rotation(NamedTuple):
    """RoPE for the positions of one forward pass: computed once, applied to every layer's q, k.

    Plain path: cos and sin tables of shape (L, 1, 2, head_dim/2) for `norm_rope`, whose
    arithmetic is the reference. Fast path (Metal): the fused qk-norm+RoPE kernel, given the
    offset and inverse frequencies; where that is unusable, `mx.fast.rms_norm` and `mx.fast.rope`.
    """

    offset: int | mx.array
    cos: mx.array | None = None
    sin: mx.array | None = None
    wavelengths: mx.array | None = None
    inv_freq: mx.array | None = None

    def __call__(self, x: mx.array, norm: RMSNorm) -> mx.array:
        """RMSNorm each head of x (B, L, heads, head_dim), then rotate; (B, heads, L, head_dim)."""
        if self.cos is not None:
            return norm_rope(x, norm.weight, norm.eps, self.cos, self.sin)
        if self.inv_freq is not None and qk_rope_kernel_usable(x, norm.weight):
            return qk_norm_rope(x, norm.weight, norm.eps, self.offset, self.inv_freq)
        return mx.fast.rope(
            norm(x).transpose(0, 2, 1, 3),
            x.shape[-1],
            traditional=False,
            base=None,
            scale=1.0,
            offset=self.offset,
            freqs=self.wavelengths,
        )


class RoPE(nn.Module):
    """Rotate-half (non-interleaved) rotary embedding from precomputed inverse frequencies."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        self._inv_freq = mx.array(rope_inv_freq(args))
        self._wavelengths = 1.0 / self._inv_freq  # what mx.fast.rope calls `freqs`
        self.fast = False

    def __call__(self, length: int, offset: int | mx.array) -> Rotation:
        """The rotation of positions offset .. offset + length - 1."""
        if self.fast:
            return Rotation(offset, wavelengths=self._wavelengths, inv_freq=self._inv_freq)
        return Rotation(offset, *rope_tables(length, offset, self._inv_freq))


class XIELU(nn.Module):
    """xIELU with per-layer learned scalars; `fold()` turns them into inference constants."""

    def __init__(self):
        super().__init__()
        self.alpha_p = mx.array(math.log(math.expm1(0.8)))
        self.alpha_n = mx.array(math.log(math.expm1(0.8 - XIELU_BETA)))
        self.beta = mx.array(XIELU_BETA)
        self.eps = mx.array(XIELU_EPS)
        self.fold()

    def fold(self) -> None:
        f32 = mx.float32
        self._beta = self.beta.astype(f32).reshape(())
        self._eps = self.eps.astype(f32).reshape(())
        self._a_p = nn.softplus(self.alpha_p.astype(f32)).reshape(())
        self._a_n = (self._beta + nn.softplus(self.alpha_n.astype(f32))).reshape(())
        mx.eval(self._beta, self._eps, self._a_p, self._a_n)

    def __call__(self, x: mx.array) -> mx.array:
        return xielu(x, self._a_p, self._a_n, self._beta, self._eps)


class Attention(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.n_heads = args.num_attention_heads
        self.n_kv_heads = args.num_key_value_heads
        self.head_dim = args.head_dim
        self.scale = args.head_dim**-0.5
        bias = args.attention_bias
        self.q_proj = nn.Linear(args.hidden_size, self.n_heads * self.head_dim, bias=bias)
        self.k_proj = nn.Linear(args.hidden_size, self.n_kv_heads * self.head_dim, bias=bias)
        self.v_proj = nn.Linear(args.hidden_size, self.n_kv_heads * self.head_dim, bias=bias)
        self.o_proj = nn.Linear(self.n_heads * self.head_dim, args.hidden_size, bias=bias)
        self.q_norm = RMSNorm(self.head_dim, args.rms_norm_eps)
        self.k_norm = RMSNorm(self.head_dim, args.rms_norm_eps)

    def project_qkv(self, x: mx.array) -> tuple[mx.array, mx.array, mx.array]:
        if "qkv_proj" in self:  # fused at load: one matmul instead of three
            q_size, kv_size = self.n_heads * self.head_dim, self.n_kv_heads * self.head_dim
            qkv = self.qkv_proj(x)
            return (
                qkv[..., :q_size],
                qkv[..., q_size : q_size + kv_size],
                qkv[..., q_size + kv_size :],
            )
        return self.q_proj(x), self.k_proj(x), self.v_proj(x)

    def heads(self, x: mx.array, rotation: Rotation) -> tuple[mx.array, mx.array, mx.array]:
        """q, k, v as (B, heads, L, head_dim): projected, RMS-normed per head (q, k), rotated."""
        B, L, _ = x.shape
        q, k, v = self.project_qkv(x)
        q = rotation(q.reshape(B, L, self.n_heads, -1), self.q_norm)
        k = rotation(k.reshape(B, L, self.n_kv_heads, -1), self.k_norm)
        return q, k, v.reshape(B, L, self.n_kv_heads, -1).transpose(0, 2, 1, 3)

    def attend(self, q: mx.array, keys: mx.array, values: mx.array, mask: Any) -> mx.array:
        """Grouped-query attention of q over the keys and values, projected back."""
        B, _, L, _ = q.shape
        out = mx.fast.scaled_dot_product_attention(q, keys, values, scale=self.scale, mask=mask)
        return self.o_proj(out.transpose(0, 2, 1, 3).reshape(B, L, -1))

    def __call__(
        self, x: mx.array, mask: Any, cache: KVCache | None, layer: int, rotation: Rotation
    ) -> mx.array:
        q, k, v = self.heads(x, rotation)
        if cache is not None:
            k, v = cache.update_and_fetch(layer, k, v)
        return self.attend(q, k, v, mask)


class MLP(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.up_proj = nn.Linear(args.hidden_size, args.intermediate_size, bias=False)
        self.down_proj = nn.Linear(args.intermediate_size, args.hidden_size, bias=False)
        self.act_fn = XIELU()

    def __call__(self, x: mx.array) -> mx.array:
        return self.down_proj(self.act_fn(self.up_proj(x)))


class DecoderLayer(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.self_attn = Attention(args)
        self.mlp = MLP(args)
        self.attention_layernorm = RMSNorm(args.hidden_size, args.rms_norm_eps)
        self.feedforward_layernorm = RMSNorm(args.hidden_size, args.rms_norm_eps)

    def __call__(self, x, mask, cache, layer, rotation) -> mx.array:
        h = x + self.self_attn(self.attention_layernorm(x), mask, cache, layer, rotation)
        return h + self.mlp(self.feedforward_layernorm(h))


class ApertusModel(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.embed_tokens = nn.Embedding(args.vocab_size, args.hidden_size)
        self.layers = [DecoderLayer(args) for _ in range(args.num_hidden_layers)]
        self.norm = RMSNorm(args.hidden_size, args.rms_norm_eps)
        self.rope = RoPE(args)

    def __call__(self, inputs: mx.array, cache: KVCache | None = None) -> mx.array:
        h = self.embed(inputs)
        offset = cache.offset if cache is not None else 0
        mask = "causal" if inputs.shape[1] > 1 else None
        rotation = self.rope(inputs.shape[1], offset)
        for i, layer in enumerate(self.layers):
            h = layer(h, mask, cache, i, rotation)
        if cache is not None:
            cache.advance(inputs.shape[1])
        return self.norm(h)

    def embed(self, inputs: mx.array) -> mx.array:
        """Token embeddings in the compute dtype.

        A quantized embedding dequantizes in its scales' dtype, which may be the stored one
        (bfloat16, see `loading.cast_weights`); so the looked-up rows' scales are widened first.
        """
        dtype = self.norm.weight.dtype
        table = self.embed_tokens
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
    """ApertusForCausalLM: `model(input_ids, cache=None)` -> logits (batch, length, vocab)."""

    generation = GenerationConfig()  # the checkpoint's, set by apertus_mlx.load; none: no stops

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        self.model = ApertusModel(args)
        if not args.tie_word_embeddings:
            self.lm_head = nn.Linear(args.hidden_size, args.vocab_size, bias=False)

    def __call__(self, inputs: mx.array, cache: KVCache | None = None) -> mx.array:
        return self.logits(self.model(inputs, cache))

    def logits(self, hidden: mx.array) -> mx.array:
        if self.args.tie_word_embeddings:
            return self.model.embed_tokens.as_linear(hidden)
        return self.lm_head(hidden)

    @property
    def layers(self) -> list[DecoderLayer]:
        return self.model.layers

    def make_cache(self) -> KVCache:
        return KVCache(len(self.layers))

    def set_fast_ops(self, enabled: bool) -> None:
        """Use `mx.fast` RMSNorm/RoPE kernels (Metal) or plain fusable ops (CPU)."""
        for _, module in self.named_modules():
            if isinstance(module, (RMSNorm, RoPE)):
                module.fast = enabled

    def fold_constants(self) -> None:
        for layer in self.layers:
            layer.mlp.act_fn.fold()
