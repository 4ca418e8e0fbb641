"""Streaming decode: pieces are whole characters and always add up to `decode(ids)`."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from apertus_mlx.tokenizer import _BYTE_OF_CHAR, load_tokenizer
from tests.fixture_tokenizer import SAMPLE_TEXTS


@pytest.fixture(scope="module")
def tok(tokenizer_dir):
    return load_tokenizer(tokenizer_dir)


def _stream(tok, ids, **kwargs) -> tuple[list[str], str]:
    detok = tok.detokenizer(**kwargs)
    pieces = [detok.add(i) for i in ids]
    pieces.append(detok.finalize())
    assert detok.text == "".join(pieces)
    return pieces, detok.text


@pytest.mark.parametrize("text", SAMPLE_TEXTS)
def test_streamed_text_equals_decode(tok, text):
    ids = tok.encode(text)
    pieces, streamed = _stream(tok, ids)
    assert streamed == tok.decode(ids) == text
    assert not any("\ufffd" in p for p in pieces)


def test_multibyte_characters_are_held_back(tok):
    # One token per byte of "😀": nothing comes out until the character is complete.
    byte_level = {b: c for c, b in _BYTE_OF_CHAR.items()}
    ids = [tok.token_to_id(byte_level[b]) for b in "😀".encode()]
    detok = tok.detokenizer()
    assert [detok.add(i) for i in ids] == ["", "", "", "😀"]
    assert detok.finalize() == ""
    detok = tok.detokenizer()
    detok.add(ids[0])
    assert detok.finalize() == "\ufffd" == tok.decode(ids[:1])


def test_special_tokens_in_stream(tok):
    ids = [1, 67, *tok.encode("Grüezi 🇨🇭"), 68]
    assert (
        _stream(tok, ids)[1]
        == tok.decode(ids)
        == "<s><|assistant_start|>Grüezi 🇨🇭<|assistant_end|>"
    )
    assert _stream(tok, ids, skip_special_tokens=True)[1] == "Grüezi 🇨🇭"


@settings(
    max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(data=st.data())
def test_any_token_sequence_streams_like_decode(tok, data):
    ids = data.draw(st.lists(st.integers(0, tok.vocab_size + 3), max_size=40))
    skip = data.draw(st.booleans())
    _, streamed = _stream(tok, ids, skip_special_tokens=skip)
    assert streamed == tok.decode(ids, skip_special_tokens=skip)
