"""ModelArgs: the Apertus hyper-parameters, read from a checkpoint's config.json.

Accepts both spellings of the RoPE settings: `rope_theta` + `rope_scaling` (transformers 4,
with `type` or `rope_type`) and `rope_parameters` (transformers 5, `rope_theta` inside).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import ConfigError, UnsupportedModelError

SUPPORTED_MODEL_TYPES = ("apertus",)
DEFAULT_ROPE_THETA = 12_000_000.0


@dataclass(frozen=True)
class RopeScaling:
    """llama3 frequency scaling (the only kind Apertus checkpoints use)."""

    factor: float
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192


@dataclass(frozen=True)
class ModelArgs:
    hidden_size: int
    num_hidden_layers: int
    intermediate_size: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    vocab_size: int
    rms_norm_eps: float = 1e-5
    rope_theta: float = DEFAULT_ROPE_THETA
    rope_scaling: RopeScaling | None = None
    max_position_embeddings: int = 65536
    tie_word_embeddings: bool = False
    attention_bias: bool = False  # transformers honours it; `mlp_bias` it ignores, and so do we
    bos_token_id: int | None = 1
    eos_token_ids: tuple[int, ...] = (2,)
    pad_token_id: int | None = 3
    quantization: dict[str, Any] | None = field(default=None, compare=False)

    @classmethod
    def from_dict(cls, config: dict[str, Any]) -> ModelArgs:
        model_type = config.get("model_type")
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise UnsupportedModelError(
                f"config.json has model_type {model_type!r}; apertus-mlx runs only 'apertus' models"
            )
        act = config.get("hidden_act", "xielu")
        if act != "xielu":
            raise UnsupportedModelError(f"config.json has hidden_act {act!r}; Apertus uses 'xielu'")
        try:
            hidden = int(config["hidden_size"])
            heads = int(config["num_attention_heads"])
            theta, scaling = _rope(config)
            eos = config.get("eos_token_id", 2)
            return cls(
                hidden_size=hidden,
                num_hidden_layers=int(config["num_hidden_layers"]),
                intermediate_size=int(config["intermediate_size"]),
                num_attention_heads=heads,
                num_key_value_heads=int(config.get("num_key_value_heads") or heads),
                head_dim=int(config.get("head_dim") or hidden // heads),
                vocab_size=int(config["vocab_size"]),
                rms_norm_eps=float(config.get("rms_norm_eps", 1e-5)),
                rope_theta=theta,
                rope_scaling=scaling,
                max_position_embeddings=int(config.get("max_position_embeddings", 65536)),
                tie_word_embeddings=bool(config.get("tie_word_embeddings", False)),
                attention_bias=bool(config.get("attention_bias", False)),
                bos_token_id=config.get("bos_token_id", 1),
                eos_token_ids=tuple(
                    eos if isinstance(eos, list) else [eos] if eos is not None else []
                ),
                pad_token_id=config.get("pad_token_id", 3),
                quantization=config.get("quantization"),
            )
        except KeyError as e:
            raise ConfigError(f"config.json lacks the required key {e.args[0]!r}") from None
        except (TypeError, ValueError) as e:
            raise ConfigError(f"config.json has a malformed value: {e}") from None

    @classmethod
    def from_dir(cls, path: str | Path) -> ModelArgs:
        return cls.from_dict(read_config(path))

    def __post_init__(self) -> None:
        if self.num_attention_heads % self.num_key_value_heads:
            raise ConfigError(
                f"num_attention_heads ({self.num_attention_heads}) is not a multiple of "
                f"num_key_value_heads ({self.num_key_value_heads})"
            )


def read_config(path: str | Path) -> dict[str, Any]:
    """config.json of a checkpoint directory as a dict, with errors a user can act on."""
    file = Path(path) / "config.json"
    if not file.is_file():
        raise ConfigError(f"{path} has no config.json: is it a Hugging Face checkpoint directory?")
    try:
        config = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ConfigError(f"cannot read {file}: {e}") from None
    if not isinstance(config, dict):
        raise ConfigError(f"{file} is not a JSON object")
    return config


def _rope(config: dict[str, Any]) -> tuple[float, RopeScaling | None]:
    params = config.get("rope_parameters") or config.get("rope_scaling")
    if params is None:
        if "rope_theta" in config:  # explicit theta, no scaling: plain RoPE
            return float(config["rope_theta"]), None
        # Nothing said at all: transformers' ApertusConfig default, llama3 at theta 12e6.
        params = {"rope_type": "llama3", "factor": 8.0, "original_max_position_embeddings": 8192}
    theta = float(params.get("rope_theta", config.get("rope_theta", DEFAULT_ROPE_THETA)))
    kind = params.get("rope_type", params.get("type", "default"))
    if kind == "default":
        return theta, None
    if kind != "llama3":
        raise UnsupportedModelError(f"config.json uses rope type {kind!r}; only 'llama3' is known")
    scaling = RopeScaling(
        factor=float(params["factor"]),
        low_freq_factor=float(params.get("low_freq_factor", 1.0)),
        high_freq_factor=float(params.get("high_freq_factor", 4.0)),
        original_max_position_embeddings=int(
            params.get(
                "original_max_position_embeddings", config.get("max_position_embeddings", 8192)
            )
        ),
    )
    return theta, scaling
