"""Random-weight Apertus checkpoints of the model-card shapes, built once under `.bench-cache/`.

Speed does not depend on what the weights are, so random ones (normal * 0.02, norms near 1)
stand in for the real checkpoints: nothing to download, and both engines read the very same
files. Quantized variants are written by mlx-lm's own quantizer, so the INT-n layout (packed
uint32, bf16 scales and biases) is exactly what mlx-lm publishes.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import mlx.core as mx

CACHE = Path(__file__).resolve().parent.parent / ".bench-cache"


@dataclass(frozen=True)
class Shape:
    layers: int
    hidden: int
    mlp: int
    heads: int
    kv_heads: int
    vocab: int
    tied: bool


SHAPES = {
    "0.5B": Shape(20, 1024, 6144, 16, 4, 131072, tied=True),
    "1.5B": Shape(16, 2048, 12288, 32, 8, 131072, tied=False),
    "narrow": Shape(20, 64, 384, 4, 1, 1536, tied=True),
}


@dataclass(frozen=True)
class BenchModel:
    """One row of `make bench`: a shape, a format and how many tokens to time."""

    name: str
    shape: str
    bits: int | None  # None: BF16
    prompt_tokens: int
    gen_tokens: int
    quick: tuple[int, int]  # (prompt, gen) for --quick


# Token counts keep `make bench` under ~10 minutes on a 2-core CPU. mlx-lm computes in
# bfloat16 there, and its quantized matmuls are slow (about 0.3 tok/s for the 0.5B at INT4,
# prefill no faster per token than decode), so the quantized rows time few tokens.
MODELS = [
    BenchModel("narrow-bf16", "narrow", None, 128, 64, (32, 16)),
    BenchModel("0.5B-bf16", "0.5B", None, 32, 8, (8, 3)),
    BenchModel("0.5B-int4", "0.5B", 4, 8, 4, (4, 2)),
    BenchModel("0.5B-int3", "0.5B", 3, 8, 4, (4, 2)),
    BenchModel("1.5B-bf16", "1.5B", None, 16, 4, (4, 2)),
    BenchModel("1.5B-int4", "1.5B", 4, 4, 3, (2, 2)),
]


def config_for(shape: Shape) -> dict:
    """config.json with the keys both transformers and mlx-lm need (rope at top level too)."""
    return {
        "architectures": ["ApertusForCausalLM"],
        "model_type": "apertus",
        "hidden_act": "xielu",
        "hidden_size": shape.hidden,
        "intermediate_size": shape.mlp,
        "num_hidden_layers": shape.layers,
        "num_attention_heads": shape.heads,
        "num_key_value_heads": shape.kv_heads,
        "head_dim": shape.hidden // shape.heads,
        "vocab_size": shape.vocab,
        "max_position_embeddings": 65536,
        "rms_norm_eps": 1e-5,
        "rope_theta": 12000000.0,
        "rope_scaling": {
            "rope_type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8192,
        },
        "tie_word_embeddings": shape.tied,
        "attention_bias": False,
        "mlp_bias": False,
        "post_norm": False,
        "qk_norm": True,
        "bos_token_id": 1,
        "eos_token_id": 68,
        "pad_token_id": 3,
        "torch_dtype": "bfloat16",
    }


def random_weights(shape: Shape, seed: int = 0) -> dict[str, mx.array]:
    """HF-named tensors in bfloat16; xIELU scalars per layer, as 0-d arrays."""
    key = mx.random.key(seed)
    dtype = mx.bfloat16
    head_dim = shape.hidden // shape.heads

    def normal(*dims: int, scale: float = 0.02) -> mx.array:
        nonlocal key
        key, sub = mx.random.split(key)
        return (mx.random.normal(dims, key=sub) * scale).astype(dtype)

    def norm(dim: int) -> mx.array:
        return (1.0 + normal(dim, scale=0.05).astype(mx.float32)).astype(dtype)

    w = {"model.embed_tokens.weight": normal(shape.vocab, shape.hidden)}
    for i in range(shape.layers):
        p = f"model.layers.{i}."
        w[p + "self_attn.q_proj.weight"] = normal(shape.heads * head_dim, shape.hidden)
        w[p + "self_attn.k_proj.weight"] = normal(shape.kv_heads * head_dim, shape.hidden)
        w[p + "self_attn.v_proj.weight"] = normal(shape.kv_heads * head_dim, shape.hidden)
        w[p + "self_attn.o_proj.weight"] = normal(shape.hidden, shape.heads * head_dim)
        w[p + "self_attn.q_norm.weight"] = norm(head_dim)
        w[p + "self_attn.k_norm.weight"] = norm(head_dim)
        w[p + "attention_layernorm.weight"] = norm(shape.hidden)
        w[p + "feedforward_layernorm.weight"] = norm(shape.hidden)
        w[p + "mlp.up_proj.weight"] = normal(shape.mlp, shape.hidden)
        w[p + "mlp.down_proj.weight"] = normal(shape.hidden, shape.mlp)
        w[p + "mlp.act_fn.alpha_p"] = (normal(scale=0.5) + 0.25).astype(dtype)
        w[p + "mlp.act_fn.alpha_n"] = (normal(scale=0.5) + 0.25).astype(dtype)
        w[p + "mlp.act_fn.beta"] = mx.array(0.5, dtype=dtype)
        w[p + "mlp.act_fn.eps"] = mx.array(-1e-6, dtype=dtype)
    w["model.norm.weight"] = norm(shape.hidden)
    if not shape.tied:
        w["lm_head.weight"] = normal(shape.vocab, shape.hidden)
    return w


def write_bf16(shape: Shape, out: Path) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    weights = random_weights(shape)
    mx.eval(weights)
    mx.save_safetensors(str(out / "model.safetensors"), weights, metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps(config_for(shape), indent=2))
    return out


def write_quantized(src: Path, out: Path, bits: int, group_size: int = 64) -> Path:
    """Quantize with mlx-lm's own functions (what `mlx_lm.convert -q` does, minus the
    tokenizer, which these checkpoints do not have)."""
    from mlx_lm.utils import load_model, quantize_model, save_config, save_model

    model, config = load_model(src, lazy=True)
    model, config = quantize_model(model, config, group_size, bits)
    save_model(out, model, donate_model=True)
    save_config(config, out / "config.json")
    return out


def ensure(model: BenchModel, cache: Path = CACHE) -> Path:
    """The checkpoint directory for `model`, built on first use (a half-written one is redone)."""
    bf16 = cache / f"{model.shape}-bf16"
    if not (bf16 / "config.json").is_file():
        shutil.rmtree(bf16, ignore_errors=True)
        tmp = cache / f"{model.shape}-bf16.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        write_bf16(SHAPES[model.shape], tmp).rename(bf16)
        mx.clear_cache()
    if model.bits is None:
        return bf16
    out = cache / f"{model.shape}-int{model.bits}"
    if not (out / "config.json").is_file():
        shutil.rmtree(out, ignore_errors=True)
        tmp = cache / f"{model.shape}-int{model.bits}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        write_quantized(bf16, tmp, model.bits).rename(out)
        mx.clear_cache()
    return out
