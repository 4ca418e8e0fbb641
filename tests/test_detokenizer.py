"""Streaming decode: pieces are whole characters and always add up to `decode(ids)`."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from apertus_mlx.tokenizer import _BYTE_OF_CHAR, load_tokenizer
from fixtures.tokenizer import SAMPLE_TEXTS


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


@pytest.fixture(scope="module")
def byte_fallback_tok():
    """A SentencePiece-style tokenizer (Metaspace, <0xNN> byte fallback, leading-space strip):
    not byte-level, so the detokenizer's other path runs."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers

    from apertus_mlx.tokenizer import Tokenizer as Ours

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    vocab.update({f"<0x{b:02X}>": 3 + b for b in range(256)})
    for piece in [*"▁abcdefghijklmnopqrstuvwxyzGW.,!?äöü", "▁d", "▁de", "▁der", "er"]:
        vocab[piece] = len(vocab)
    merges = [("▁", "d"), ("▁d", "e"), ("▁de", "r"), ("e", "r")]
    hf = Tokenizer(models.BPE(vocab, merges, byte_fallback=True, unk_token="<unk>"))
    hf.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    hf.decoder = decoders.Sequence(
        [
            decoders.Replace("▁", " "),
            decoders.ByteFallback(),
            decoders.Fuse(),
            decoders.Strip(" ", 1, 0),
        ]
    )
    hf.add_special_tokens([AddedToken("<s>", special=True), AddedToken("</s>", special=True)])
    return Ours(hf, {}, None)


def test_byte_fallback_text_streams_like_decode(byte_fallback_tok):
    ids = byte_fallback_tok.encode("Grüezi der Welt 😀 日本")
    pieces, streamed = _stream(byte_fallback_tok, ids)
    assert streamed == byte_fallback_tok.decode(ids) == "Grüezi der Welt 😀 日本"
    assert not any("\ufffd" in p for p in pieces)


@settings(
    max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(data=st.data())
def test_any_text_cut_anywhere_streams_like_decode(byte_fallback_tok, data):
    # Any text, cut at any token that ends a character. Not arbitrary ids, nor mid-character
    # cuts: tokenizers' ByteFallback decodes a byte run that is not whole UTF-8 as one U+FFFD per
    # byte (so [0x00] gives "\x00" but [0x00, 0x80] two U+FFFD): no stream can follow decode
    # there, and tokenizers' own DecodeStream raises.
    tok = byte_fallback_tok
    ids = tok.encode(data.draw(st.text(max_size=20)))
    ids = ids[: data.draw(st.integers(0, len(ids)))]
    assume("\ufffd" not in tok.decode(ids))
    skip = data.draw(st.booleans())
    pieces, streamed = _stream(tok, ids, skip_special_tokens=skip)
    assert streamed == tok.decode(ids, skip_special_tokens=skip)
    assert not any("\ufffd" in p for p in pieces)
