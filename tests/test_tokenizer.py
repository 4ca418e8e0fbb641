"""Plain encode/decode, special tokens as text, stop ids from three files, load errors."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from apertus_mlx.config import GenerationConfig
from apertus_mlx.errors import ConfigError, TokenizerError
from apertus_mlx.tokenizer import load_tokenizer
from fixtures.tokenizer import SAMPLE_TEXTS


@pytest.fixture(scope="module")
def tok(tokenizer_dir):
    return load_tokenizer(tokenizer_dir)


@pytest.fixture(scope="module")
def hf(tokenizer_dir):
    transformers = pytest.importorskip("transformers")
    return transformers.AutoTokenizer.from_pretrained(tokenizer_dir)


def _variant(src: Path, dst: Path, **files: object) -> Path:
    """A copy of the tokenizer directory with extra or replaced JSON files."""
    shutil.copytree(src, dst)
    for name, content in files.items():
        text = content if isinstance(content, str) else json.dumps(content)
        (dst / name.replace("__", ".")).write_text(text, "utf-8")
    return dst


def test_basic_attributes(tok, vocab_size):
    assert tok.vocab_size == vocab_size
    assert (tok.bos_token, tok.bos_token_id, tok.eos_token) == ("<s>", 1, "</s>")
    assert tok.token_to_id("<|system_start|>") == 61
    assert tok.token_to_id("<|assistant_end|>") == 68
    assert tok.token_to_id("<|tools_suffix|>") == 72
    assert tok.token_to_id("definitely not a token") is None
    assert tok.has_chat_template
    assert tok.end_token_ids() == (2, 68)


@pytest.mark.parametrize("text", SAMPLE_TEXTS)
def test_encode_matches_transformers_and_round_trips(tok, hf, text):
    ids = tok.encode(text)
    assert ids == hf.encode(text, add_special_tokens=False)
    assert tok.encode(text, add_special_tokens=True) == [1, *ids]
    assert tok.decode(ids) == text


def test_special_token_strings_are_text(tok):
    special = [t for t in json.loads(tok._tok.to_str())["added_tokens"] if t["special"]]
    text = " ".join(t["content"] for t in special)
    ids = tok.encode(text)
    assert not set(ids) & {t["id"] for t in special}
    assert tok.decode(ids) == text
    # The non-special LaTeX openers still tokenize as their own ids, as in the real vocabulary.
    assert 14 in tok.encode("\\begin{x}")


def test_decode_skips_special_tokens_on_request(tok):
    ids = [1, *tok.encode("Hi"), 68]
    assert tok.decode(ids) == "<s>Hi<|assistant_end|>"
    assert tok.decode(ids, skip_special_tokens=True) == "Hi"


def _generation(d: Path) -> GenerationConfig:
    return GenerationConfig.from_dir(d, load_tokenizer(d).end_token_ids())


def test_eos_ids_are_the_union_of_three_files(tokenizer_dir, tmp_path):
    d = _variant(tokenizer_dir, tmp_path / "z", config__json={})
    assert _generation(d) == GenerationConfig(eos_token_ids=(2, 68))
    d = _variant(
        tokenizer_dir,
        tmp_path / "a",
        config__json={"eos_token_id": 2},
        generation_config__json={"eos_token_id": [2, 72], "temperature": 0.8, "top_p": 0.9},
    )
    assert _generation(d) == GenerationConfig(eos_token_ids=(2, 68, 72), temperature=0.8, top_p=0.9)
    d = _variant(
        tokenizer_dir,
        tmp_path / "b",
        config__json={"eos_token_id": [5, 6]},
        generation_config__json={"eos_token_id": 7, "max_new_tokens": 32, "top_k": None},
    )
    assert _generation(d) == GenerationConfig(eos_token_ids=(2, 5, 6, 7, 68), max_new_tokens=32)
    d = _variant(
        tokenizer_dir,
        tmp_path / "c",
        config__json={},
        generation_config__json={"do_sample": False, "temperature": 0.6},
    )
    assert _generation(d).temperature == 0.0


@pytest.mark.parametrize(
    "content, message",
    [
        (
            {"temperature": "hot"},
            'generation_config.json: temperature must be a number >= 0, got "hot"',
        ),
        ({"top_p": 5}, "generation_config.json: top_p must be a number in (0, 1], got 5"),
        ({"top_k": -1}, "generation_config.json: top_k must be an integer >= 0, got -1"),
        ({"eos_token_id": "x"}, "generation_config.json: eos_token_id must be a token id"),
        ({"do_sample": "no"}, "generation_config.json: do_sample must be true or false"),
        ([1, 2], "generation_config.json is not a JSON object"),
    ],
)
def test_bad_generation_config_names_the_file(tokenizer_dir, tmp_path, content, message):
    d = _variant(tokenizer_dir, tmp_path / "g", config__json={}, generation_config__json=content)
    with pytest.raises(ConfigError) as e:
        _generation(d)
    assert str(e.value).startswith(message)


def test_eos_token_from_config_is_included(tokenizer_dir, tmp_path):
    config = json.loads((tokenizer_dir / "tokenizer_config.json").read_text())
    config["eos_token"] = {"content": "<|tools_suffix|>", "special": True}
    tok = load_tokenizer(_variant(tokenizer_dir, tmp_path / "d", tokenizer_config__json=config))
    assert tok.eos_token == "<|tools_suffix|>"
    assert tok.end_token_ids() == (68, 72)


def test_tokenizer_config_that_is_not_an_object(tokenizer_dir, tmp_path):
    d = _variant(tokenizer_dir, tmp_path / "d", tokenizer_config__json=[1])
    with pytest.raises(TokenizerError, match="tokenizer_config.json is not a JSON object"):
        load_tokenizer(d)


def test_missing_tokenizer_json(tmp_path):
    with pytest.raises(TokenizerError, match="tokenizer.json"):
        load_tokenizer(tmp_path)


def test_corrupt_tokenizer_json(tokenizer_dir, tmp_path):
    d = _variant(tokenizer_dir, tmp_path / "d", tokenizer__json='{"model": ')
    with pytest.raises(TokenizerError, match="tokenizer.json"):
        load_tokenizer(d)


def test_corrupt_tokenizer_config(tokenizer_dir, tmp_path):
    d = _variant(tokenizer_dir, tmp_path / "d", tokenizer_config__json="not json")
    with pytest.raises(TokenizerError, match="tokenizer_config.json"):
        load_tokenizer(d)


def test_template_that_does_not_compile(tokenizer_dir, tmp_path):
    d = _variant(tokenizer_dir, tmp_path / "d", chat_template__jinja="{% if %}")
    with pytest.raises(TokenizerError, match="chat template"):
        load_tokenizer(d)


def test_template_from_tokenizer_config(tokenizer_dir, tmp_path):
    d = tmp_path / "d"
    shutil.copytree(tokenizer_dir, d)
    (d / "chat_template.jinja").unlink()
    config = json.loads((d / "tokenizer_config.json").read_text())
    config["chat_template"] = [
        {"name": "tool_use", "template": "TOOLS"},
        {"name": "default", "template": "{{ bos_token }}{{ messages[0].content }}"},
    ]
    (d / "tokenizer_config.json").write_text(json.dumps(config))
    tok = load_tokenizer(d)
    assert tok.has_chat_template
    assert tok.render_chat([{"role": "user", "content": "hey"}]) == "<s>hey"
    config["chat_template"] = "[{{ messages | length }}]"
    (d / "tokenizer_config.json").write_text(json.dumps(config))
    assert load_tokenizer(d).render_chat([{"role": "user", "content": "x"}]) == "[1]"
