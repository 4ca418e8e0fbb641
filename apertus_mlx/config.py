"""What a checkpoint says about itself: `ModelArgs` (the architecture, config.json) and
`GenerationConfig` (end tokens and sampling defaults, config.json + generation_config.json).

Both are read once, at load, and validated there: a bad value becomes one ConfigError that
names the file and the key, not a ZeroDivisionError deep in the model. ModelArgs accepts both
spellings of the RoPE settings: `rope_theta` + `rope_scaling` (transformers 4, with `type` or
`rope_type`) and `rope_parameters` (transformers 5, `rope_theta` inside).
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import ConfigError, UnsupportedModelError

SUPPORTED_MODEL_TYPES = ("apertus",)
DEFAULT_ROPE_THETA = 12_000_000.0
CONFIG = "config.json"
GENERATION_CONFIG = "generation_config.json"
REQUIRED_KEYS = (
    "hidden_size",
    "num_attention_heads",
    "num_hidden_layers",
    "intermediate_size",
    "vocab_size",
)


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
    quantization: dict[str, Any] | None = field(default=None, compare=False)

    @classmethod
    def from_dict(cls, config: dict[str, Any]) -> ModelArgs:
        """Every value checked for type and range; errors name config.json and the key."""
        model_type = config.get("model_type")
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise UnsupportedModelError(
                f"config.json has model_type {model_type!r}; apertus-mlx runs only 'apertus' models"
            )
        act = config.get("hidden_act", "xielu")
        if act != "xielu":
            raise UnsupportedModelError(f"config.json has hidden_act {act!r}; Apertus uses 'xielu'")
        for key in REQUIRED_KEYS:
            if config.get(key) is None:
                raise ConfigError(f"config.json lacks the required key {key!r}")
        v = _Checker(CONFIG, config)
        hidden = v.int("hidden_size")
        heads = v.int("num_attention_heads")
        kv_heads = v.int("num_key_value_heads", default=heads)
        if config.get("head_dim") is None and hidden % heads:
            raise ConfigError(
                f"config.json: hidden_size ({hidden}) is not a multiple of num_attention_heads "
                f"({heads}) and no head_dim is given"
            )
        if heads % kv_heads:
            raise ConfigError(
                f"config.json: num_attention_heads ({heads}) is not a multiple of "
                f"num_key_value_heads ({kv_heads})"
            )
        theta, scaling = _rope(config)
        return cls(
            hidden_size=hidden,
            num_hidden_layers=v.int("num_hidden_layers"),
            intermediate_size=v.int("intermediate_size"),
            num_attention_heads=heads,
            num_key_value_heads=kv_heads,
            head_dim=v.int("head_dim", default=hidden // heads),
            vocab_size=v.int("vocab_size"),
            rms_norm_eps=v.number("rms_norm_eps", default=1e-5, low=0, low_open=True),
            rope_theta=theta,
            rope_scaling=scaling,
            max_position_embeddings=v.int("max_position_embeddings", default=65536),
            tie_word_embeddings=v.bool("tie_word_embeddings", default=False),
            attention_bias=v.bool("attention_bias", default=False),
            quantization=_quantization(config.get("quantization")),
        )

    @classmethod
    def from_dir(cls, path: str | Path) -> ModelArgs:
        return cls.from_dict(read_config(path))


@dataclass(frozen=True)
class GenerationConfig:
    """When to stop and how to sample, as the checkpoint recommends; None: not set.

    `eos_token_ids` is the union of config.json's and generation_config.json's
    `eos_token_id` and the tokenizer's end-of-turn ids (`end_token_ids`): a config EOS
    that replaced the template's turn end would let answers run past the turn.
    """

    eos_token_ids: tuple[int, ...] = ()
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None
    max_new_tokens: int | None = None

    @classmethod
    def from_dir(cls, path: str | Path, end_token_ids: Iterable[int] = ()) -> GenerationConfig:
        path = Path(path)
        config = read_config(path)
        gen = _read_json_object(path / GENERATION_CONFIG, GENERATION_CONFIG)
        g = _Checker(GENERATION_CONFIG, gen)
        ids = {*_Checker(CONFIG, config).ids("eos_token_id"), *g.ids("eos_token_id")}
        ids.update(int(i) for i in end_token_ids)
        temperature = g.number("temperature", low=0)
        if g.bool("do_sample", default=None) is False:
            temperature = 0.0  # transformers' greedy switch
        return cls(
            eos_token_ids=tuple(sorted(ids)),
            temperature=temperature,
            top_p=g.number("top_p", low=0, high=1, low_open=True),
            top_k=g.int("top_k", minimum=0),
            min_p=g.number("min_p", low=0, high=1, high_open=True),
            repetition_penalty=g.number("repetition_penalty", low=0, low_open=True),
            max_new_tokens=g.int("max_new_tokens"),
        )


def read_config(path: str | Path) -> dict[str, Any]:
    """config.json of a checkpoint directory as a dict, with errors a user can act on."""
    file = Path(path) / CONFIG
    if not file.is_file():
        raise ConfigError(f"{path} has no config.json: is it a Hugging Face checkpoint directory?")
    return _read_json_object(file, CONFIG)


def _read_json_object(file: Path, label: str) -> dict[str, Any]:
    """A JSON object from `file` ({} when absent), or ConfigError naming `label`."""
    if not file.is_file():
        return {}
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ConfigError(f"cannot read {file}: {e}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{label} is not a JSON object ({file})")
    return data


def _show(value: Any) -> str:
    """A value as the user wrote it in JSON, shortened."""
    try:
        text = json.dumps(value, ensure_ascii=False)
    except (TypeError, ValueError):
        text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


class _Checker:
    """Typed reads of one JSON object; every failure names the file and the key."""

    def __init__(self, label: str, data: dict[str, Any]):
        self.label, self.data = label, data

    def _fail(self, key: str, expected: str, value: Any) -> ConfigError:
        return ConfigError(f"{self.label}: {key} must be {expected}, got {_show(value)}")

    def int(self, key: str, default: Any = None, minimum: int = 1) -> Any:
        value = self.data.get(key)
        if value is None:
            return default
        ok = isinstance(value, int) or (isinstance(value, float) and value.is_integer())
        if isinstance(value, bool) or not ok or value < minimum:
            kind = "a positive integer" if minimum == 1 else f"an integer >= {minimum}"
            raise self._fail(key, kind, value)
        return int(value)

    def number(
        self,
        key: str,
        default: Any = None,
        low: float | None = None,
        high: float | None = None,
        low_open: bool = False,
        high_open: bool = False,
    ) -> Any:
        value = self.data.get(key)
        if value is None:
            return default
        ok = isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
        if ok and low is not None:
            ok = value > low if low_open else value >= low
        if ok and high is not None:
            ok = value < high if high_open else value <= high
        if not ok:
            if low is not None and high is not None:
                left, right = "(" if low_open else "[", ")" if high_open else "]"
                kind = f"a number in {left}{low:g}, {high:g}{right}"
            elif low is not None:
                kind = f"a number {'>' if low_open else '>='} {low:g}"
            else:
                kind = "a number"
            raise self._fail(key, kind, value)
        return float(value)

    def bool(self, key: str, default: Any = None) -> Any:
        value = self.data.get(key)
        if value is None:
            return default
        if not isinstance(value, bool):
            raise self._fail(key, "true or false", value)
        return value

    def ids(self, key: str) -> list[int]:
        value = self.data.get(key)
        if value is None:
            return []
        values = value if isinstance(value, list) else [value]
        if not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in values):
            raise self._fail(key, "a token id or a list of token ids", value)
        return values


def _quantization(block: Any) -> dict[str, Any] | None:
    """mlx-lm's quantization block: defaults plus per-layer entries (a dict, or false)."""
    if block is None:
        return None
    if not isinstance(block, dict):
        raise ConfigError(f"config.json: quantization must be an object, got {_show(block)}")
    for path, value in block.items():
        if isinstance(value, dict):
            _quant_settings(value, f"quantization.{path}")
        elif path not in ("group_size", "bits", "mode") and not isinstance(value, bool):
            raise ConfigError(
                f"config.json: quantization.{path} must be an object or false, got {_show(value)}"
            )
    _quant_settings(block, "quantization")
    return block


def _quant_settings(block: dict[str, Any], where: str) -> None:
    for key in ("group_size", "bits"):
        value = block.get(key)
        if value is not None and (
            isinstance(value, bool) or not isinstance(value, int) or value < 1
        ):
            raise ConfigError(
                f"config.json: {where}.{key} must be a positive integer, got {_show(value)}"
            )
    mode = block.get("mode", "affine")
    if not isinstance(mode, str):
        raise ConfigError(f"config.json: {where}.mode must be a string, got {_show(mode)}")


def _rope(config: dict[str, Any]) -> tuple[float, RopeScaling | None]:
    params = config.get("rope_parameters") or config.get("rope_scaling")
    top = _Checker(CONFIG, config)
    if params is None:
        if "rope_theta" in config:  # explicit theta, no scaling: plain RoPE
            return top.number("rope_theta", low=0, low_open=True), None
        # Nothing said at all: transformers' ApertusConfig default, llama3 at theta 12e6.
        params = {"rope_type": "llama3", "factor": 8.0, "original_max_position_embeddings": 8192}
    if not isinstance(params, dict):
        raise ConfigError(f"config.json: rope_scaling must be an object, got {_show(params)}")
    p = _Checker(CONFIG, params)
    theta = p.number("rope_theta") or top.number(
        "rope_theta", default=DEFAULT_ROPE_THETA, low=0, low_open=True
    )
    if theta <= 0:
        raise ConfigError(f"config.json: rope_theta must be a number > 0, got {_show(theta)}")
    kind = params.get("rope_type", params.get("type", "default"))
    if kind == "default":
        return theta, None
    if kind != "llama3":
        raise UnsupportedModelError(f"config.json uses rope type {kind!r}; only 'llama3' is known")
    if params.get("factor") is None:
        raise ConfigError("config.json: the llama3 rope scaling lacks its 'factor'")
    scaling = RopeScaling(
        factor=p.number("factor", low=0, low_open=True),
        low_freq_factor=p.number("low_freq_factor", default=1.0, low=0, low_open=True),
        high_freq_factor=p.number("high_freq_factor", default=4.0, low=0, low_open=True),
        original_max_position_embeddings=p.int(
            "original_max_position_embeddings",
            default=top.int("max_position_embeddings", default=8192),
        ),
    )
    if scaling.low_freq_factor == scaling.high_freq_factor:
        raise ConfigError(
            "config.json: rope low_freq_factor and high_freq_factor must differ "
            f"(both {scaling.low_freq_factor:g})"
        )
    return theta, scaling
