"""xIELU with its learned scalars already folded: a_p = softplus(alpha_p), a_n = beta + softplus(alpha_n).

The portable path is one `mx.compile`d function, so the where/expm1/multiply chain runs as one
fused kernel; the constants are inputs, so one compiled graph serves every layer.
"""

from __future__ import annotations

import mlx.core as mx


def xielu_reference(x: mx.array, a_p: mx.array, a_n: mx.array, beta: mx.array, eps: mx.array) -> mx.array:
    """The formula as transformers writes it, computed in float32 and cast back."""
    xf = x.astype(mx.float32)
    positive = a_p * xf * xf + beta * xf
    negative = (mx.expm1(mx.minimum(xf, eps)) - xf) * a_n + beta * xf
    return mx.where(xf > 0, positive, negative).astype(x.dtype)


_xielu_compiled = mx.compile(xielu_reference)


def xielu(x: mx.array, a_p: mx.array, a_n: mx.array, beta: mx.array, eps: mx.array) -> mx.array:
    return _xielu_compiled(x, a_p, a_n, beta, eps)
