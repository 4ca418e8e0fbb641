"""Tiny random Apertus checkpoints, written by transformers itself (the reference), and the
`apertus-mlx` processes tests run on them.

Learned scalars and norm weights are perturbed away from their initial values, so a port that
ignores them, or folds xIELU wrongly, cannot pass the parity tests by luck.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np

BASE: dict[str, Any] = dict(
    hidden_size=64,
    intermediate_size=160,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=1,
    max_position_embeddings=512,
    rms_norm_eps=1e-5,
    tie_word_embeddings=False,
    rope_parameters={
        "rope_type": "llama3",
        "rope_theta": 10000.0,
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 16,
    },
)

# name -> (config overrides, storage dtype, save options)
VARIANTS: dict[str, tuple[dict[str, Any], str, dict[str, Any]]] = {
    "gqa-llama3-f32": ({}, "float32", {}),
    "tied-mha-f32": ({"tie_word_embeddings": True, "num_key_value_heads": 4}, "float32", {}),
    "norope-scaling-f32": (
        {"rope_parameters": {"rope_type": "default", "rope_theta": 500000.0}},
        "float32",
        {},
    ),
    "head-dim-f32": ({"head_dim": 24, "num_key_value_heads": 2}, "float32", {}),
    "attn-bias-f32": ({"attention_bias": True, "num_hidden_layers": 1}, "float32", {}),
    "gqa-llama3-bf16": ({"num_key_value_heads": 2}, "bfloat16", {}),
    "tied-bf16-sharded": (
        {"tie_word_embeddings": True, "num_hidden_layers": 3},
        "bfloat16",
        {"max_shard_size": "100KB"},
    ),
}


def build_checkpoint(
    out_dir: Path,
    tokenizer_dir: Path | None,
    vocab_size: int,
    overrides: dict[str, Any] | None = None,
    dtype: str = "float32",
    seed: int = 0,
    **save_options: Any,
) -> Path:
    import torch
    from transformers import ApertusConfig, ApertusForCausalLM

    torch.manual_seed(seed)
    config = ApertusConfig(**{**BASE, "vocab_size": vocab_size, **(overrides or {})})
    model = ApertusForCausalLM(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("alpha_p", "alpha_n")):
                p.copy_(torch.randn_like(p) * 0.5)
            elif name.endswith("norm.weight") or "layernorm" in name:
                p.copy_(1.0 + 0.2 * torch.randn_like(p))
    model = model.to(getattr(torch, dtype))
    model.save_pretrained(out_dir, safe_serialization=True, **save_options)

    # Real Apertus configs carry these too (the RoPE settings in transformers-4 spelling
    # beside the v5 one); mlx-lm requires them.
    cfg_file = out_dir / "config.json"
    cfg = json.loads(cfg_file.read_text())
    cfg.update(mlp_bias=False, post_norm=False, qk_norm=True)
    cfg.setdefault("attention_bias", False)
    rope = dict(cfg["rope_parameters"])
    cfg["rope_theta"] = rope.pop("rope_theta")
    cfg["rope_scaling"] = rope if rope["rope_type"] != "default" else None
    cfg_file.write_text(json.dumps(cfg, indent=2))

    if tokenizer_dir is not None:
        for f in tokenizer_dir.iterdir():
            if f.is_file():
                shutil.copy(f, out_dir / f.name)
    return out_dir


def reference_model(path: Path, dtype: str = "float32"):
    """transformers' ApertusForCausalLM for the checkpoint at path."""
    import torch
    from transformers import ApertusForCausalLM

    return ApertusForCausalLM.from_pretrained(path, dtype=getattr(torch, dtype)).eval()


def build_endless_checkpoint(
    out_dir: Path, tokenizer_dir: Path, vocab_size: int, overrides: dict[str, Any] | None = None
) -> Path:
    """A long-context checkpoint whose control tokens' logits are 0: greedy decoding (the largest
    of many random logits, positive) never picks them, so a plain-text answer (no stop, no tool
    call or deliberation marker) streams until stopped."""
    from safetensors.numpy import load_file, save_file

    from fixtures.tokenizer import FIRST_BPE_ID

    path = build_checkpoint(
        out_dir,
        tokenizer_dir,
        vocab_size,
        {"max_position_embeddings": 100_000, **(overrides or {})},
    )
    weights = load_file(path / "model.safetensors")
    weights["lm_head.weight"][:FIRST_BPE_ID] = 0
    save_file(weights, path / "model.safetensors", metadata={"format": "pt"})
    return path


def cli(*args: str, stdin: str | None = None, timeout: float = 120, **kw):
    """A finished `apertus-mlx ARGS...` process (text out and err, UTF-8 whatever the locale)."""
    import os
    import subprocess
    import sys

    return subprocess.run(
        [sys.executable, "-m", "apertus_mlx", *args],
        input=stdin,
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, "PYTHONIOENCODING": "utf-8", **kw.pop("env", {})},
        **kw,
    )


def stream_generate(model: Path, *flags: str):
    """A real `apertus-mlx generate` of an endless greedy answer, as a process to signal."""
    import os
    import subprocess
    import sys

    return subprocess.Popen(
        [sys.executable, "-m", "apertus_mlx", "generate", "Erzähl mir alles.", *flags]
        + ["-m", str(model), "-n", "50000", "--temp", "0"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        encoding="utf-8",
        env={**os.environ, "PYTHONIOENCODING": "utf-8"},
    )


def finish(proc, timeout: float = 60) -> tuple[str, str]:
    """`proc.communicate()` for a process whose stdout was already read from: communicate reads
    the pipe beneath the text reader and loses what that reader had buffered (`read(1)` buffers
    a whole chunk), so a test would miss the start of the answer."""
    import threading

    outs: dict[str, str] = {}
    readers = [
        threading.Thread(target=lambda name=name, f=f: outs.__setitem__(name, f.read()))
        for name, f in (("out", proc.stdout), ("err", proc.stderr))
    ]
    for reader in readers:
        reader.start()
    proc.wait(timeout=timeout)
    for reader in readers:
        reader.join(timeout)
    return outs["out"], outs["err"]


# Scripted answers (see `build_scripted_checkpoint`): trigger -> what the model says after it.
# A trigger is a control token, a piece, or "]" (the end of tool results in a prompt).
WEATHER_CALL = '[{"get_weather": {"city": "Bern"}}]'
TOOLS = [  # the tool the scripted answers call (OpenAI's nested form)
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "Weather now",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
        },
    }
]
SCRIPTS: dict[str, dict[str, list[str]]] = {
    "deliberation": {
        "<|assistant_start|>": [
            "<|inner_prefix|>",
            "Let me think.",
            "<|inner_suffix|>",
            "Grüezi mitenand!",
        ]
    },
    "call": {
        "<|assistant_start|>": ["<|tools_prefix|>", WEATHER_CALL, "<|tools_suffix|>"],
        "]": ["It is 21 C in Bern."],
    },
    "parallel": {
        "<|assistant_start|>": [
            "<|inner_prefix|>",
            "Two cities, two calls.",
            "<|inner_suffix|>",
            "<|tools_prefix|>",
            '[{"get_weather": {"city": "Bern"}}, {"get_weather": {"city": "Chur"}}]',
            "<|tools_suffix|>",
        ]
    },
    "malformed": {
        "<|assistant_start|>": [
            "<|tools_prefix|>",
            '[{"get_weather": {city: Bern}}]',
            "<|tools_suffix|>",
        ]
    },
}
TURN_END = "<|assistant_end|>"


def build_scripted_checkpoint(
    out_dir: Path, tokenizer_dir: Path, chains: dict[str, list[str]], margin: float = 200.0
) -> Path:
    """A one-layer Apertus whose next token depends only on the last one, by construction.

    Each piece of text in `chains` becomes an added token of the tokenizer, so a chain is a
    sequence of ids: trigger, piece, piece, ..., then `<|assistant_end|>` (every token that
    no chain continues is followed by it too). The weights make the model say it at any
    temperature: a one-hot embedding (hidden size = vocabulary), `o_proj` and `down_proj` at
    zero so attention and MLP add nothing to the residual, the final RMSNorm at one, and an
    `lm_head` that maps each token's direction to its successor's logit with a margin of
    `margin` over every other token. Written by transformers, like the random checkpoints.
    """
    from safetensors.numpy import load_file, save_file
    from tokenizers import AddedToken, Tokenizer

    tok = Tokenizer.from_file(str(tokenizer_dir / "tokenizer.json"))
    pieces = [p for seq in chains.values() for p in seq]
    new = list(dict.fromkeys(p for p in pieces if tok.token_to_id(p) is None))
    tok.add_tokens([AddedToken(p, normalized=False, special=False) for p in new])
    vocab = tok.get_vocab_size(with_added_tokens=True)

    def token(piece: str) -> int:
        ids = tok.encode(piece, add_special_tokens=False).ids
        if tok.token_to_id(piece) is not None:
            return tok.token_to_id(piece)
        if len(ids) != 1:
            raise ValueError(f"trigger {piece!r} is not one token")
        return ids[0]

    end = tok.token_to_id(TURN_END)
    successor: dict[int, int] = {}
    for trigger, seq in chains.items():
        ids = [token(trigger), *map(token, seq)]
        ids += [] if ids[-1] == end else [end]
        for a, b in zip(ids, ids[1:]):
            if successor.setdefault(a, b) != b:
                raise ValueError(f"token {a} would need two successors ({successor[a]}, {b})")

    overrides = {
        "hidden_size": vocab,
        "intermediate_size": 8,
        "num_hidden_layers": 1,
        "num_attention_heads": 1,
        "num_key_value_heads": 1,
        "head_dim": 16,
    }
    path = build_checkpoint(out_dir, None, vocab, overrides)
    weights = load_file(path / "model.safetensors")
    eye = np.eye(vocab, dtype=np.float32)
    weights["model.embed_tokens.weight"] = eye
    weights["model.layers.0.self_attn.o_proj.weight"][:] = 0
    weights["model.layers.0.mlp.down_proj.weight"][:] = 0
    weights["model.norm.weight"][:] = 1
    # after the final norm, token i's hidden state is sqrt(vocab) * e_i
    head = np.zeros((vocab, vocab), dtype=np.float32)
    targets = np.array([successor.get(i, end) for i in range(vocab)])
    head[targets, np.arange(vocab)] = margin / np.sqrt(vocab)
    weights["lm_head.weight"] = head
    save_file(weights, path / "model.safetensors", metadata={"format": "pt"})

    for f in tokenizer_dir.iterdir():
        if f.is_file() and f.name != "tokenizer.json":
            shutil.copy(f, out_dir / f.name)
    tok.save(str(out_dir / "tokenizer.json"))
    return out_dir


def build_constant_checkpoint(
    out_dir: Path, tokenizer_dir: Path, vocab_size: int, target: dict[int, float]
) -> Path:
    """A checkpoint whose next-token logits are the same after any input, so every sampled
    token of one answer is an independent draw from one known distribution.

    Every `o_proj` and `down_proj` is zero and every embedding row the same vector: no layer
    adds anything to the residual stream, so the final hidden state is that vector, normed.
    The output head is set so that the logits come out near `target` (token id -> logit; the
    other tokens at -40); tests compute the exact logits from the saved weights with numpy.
    """
    import numpy as np
    from safetensors.numpy import load_file, save_file

    shape = {"num_hidden_layers": 1, "max_position_embeddings": 65536}
    path = build_checkpoint(out_dir, tokenizer_dir, vocab_size, shape)
    weights = load_file(path / "model.safetensors")
    for name, w in weights.items():
        if name.endswith(("o_proj.weight", "down_proj.weight")):
            weights[name] = np.zeros_like(w)
    embed = weights["model.embed_tokens.weight"]
    weights["model.embed_tokens.weight"] = np.broadcast_to(embed[0], embed.shape).copy()
    hidden = final_hidden(weights)
    logits = np.full(vocab_size, -40.0)
    logits[list(target)] = list(target.values())
    weights["lm_head.weight"] = (np.outer(logits, hidden) / (hidden @ hidden)).astype(np.float32)
    save_file(weights, path / "model.safetensors", metadata={"format": "pt"})
    return path


def final_hidden(weights: dict, eps: float = 1e-5):
    """The final hidden state of a `build_constant_checkpoint` model, in float64: its one
    embedding vector through the final RMSNorm (nothing else reaches it)."""
    import numpy as np

    x = weights["model.embed_tokens.weight"][0].astype(np.float64)
    return x / np.sqrt(np.mean(x * x) + eps) * weights["model.norm.weight"].astype(np.float64)


def constant_logits(path: Path):
    """The logits of a `build_constant_checkpoint` model after any input, from its saved
    weights with numpy (float64): RMSNorm, then the output head."""
    from safetensors.numpy import load_file

    weights = load_file(path / "model.safetensors")
    return weights["lm_head.weight"].astype("float64") @ final_hidden(weights)
