"""A conversation's prompt keeps the tokens the model produced, and falls back to the full
rendering when the template renders history differently."""

from __future__ import annotations

import shutil

from apertus_mlx.prompt import conversation_ids
from apertus_mlx.tokenizer import load_tokenizer


def conversation(answer_text: str, answer_tokens: list[int]) -> list[dict]:
    return [
        {"role": "system", "content": "Du bist hilfreich."},
        {"role": "user", "content": "Grüezi!"},
        {"role": "assistant", "content": answer_text, "tokens": answer_tokens},
        {"role": "user", "content": "Und wie gaht's?"},
    ]


def test_produced_tokens_stand_in_for_the_answer(tokenizer_dir):
    tok = load_tokenizer(tokenizer_dir)
    end = tok.token_to_id("<|assistant_end|>")
    inner = tok.token_to_id("<|inner_prefix|>")
    # What a model may produce: a control token inside the answer, then the end of the turn.
    produced = [*tok.encode("Hoi"), inner, *tok.encode(" zäme"), end]
    text = tok.decode(produced[:-1])
    messages = conversation(text, produced)
    first = tok.apply_chat_template(messages[:2], add_generation_prompt=True)
    full = tok.apply_chat_template(
        [{k: v for k, v in m.items() if k != "tokens"} for m in messages]
    )
    got = conversation_ids(tok, messages)
    assert got.token_exact
    assert got.ids[: len(first) + len(produced)] == first + produced
    assert got.ids != full  # the full rendering encodes the control string as text
    assert tok.decode(got.ids) == tok.decode(full)
    assert (
        got.ids[len(first) + len(produced) :] == full[-len(got.ids) + len(first) + len(produced) :]
    )


def test_a_cut_answer_gets_the_templates_end_of_turn(tokenizer_dir):
    tok = load_tokenizer(tokenizer_dir)
    end = tok.token_to_id("<|assistant_end|>")
    produced = tok.encode("Hoi zäme, wie")  # stopped by max_tokens: no end token
    got = conversation_ids(tok, conversation(tok.decode(produced), produced))
    assert got.token_exact
    i = got.ids.index(end)
    assert got.ids[i - len(produced) : i] == produced


def test_a_template_that_rewrites_history_is_followed(tokenizer_dir, tmp_path):
    """Past answers rendered in capitals: the model reads what the template makes of them."""
    d = tmp_path / "tok"
    shutil.copytree(tokenizer_dir, d)
    template = (d / "chat_template.jinja").read_text()
    assert "message.content" in template or "message['content']" in template
    # Render every assistant message in upper case, as some templates rewrite history.
    (d / "chat_template.jinja").write_text(
        "{%- for message in messages %}{{ message.role }}: "
        "{{ message.content | upper if message.role == 'assistant' else message.content }}\n"
        "{%- endfor %}{% if add_generation_prompt %}assistant: {% endif %}"
    )
    tok = load_tokenizer(d)
    produced = tok.encode("hoi zäme")
    messages = conversation("hoi zäme", produced)
    got = conversation_ids(tok, messages)
    full = tok.apply_chat_template(
        [{k: v for k, v in m.items() if k != "tokens"} for m in messages]
    )
    assert not got.token_exact and got.ids == full


def test_without_tokens_it_is_the_full_rendering(tokenizer_dir):
    tok = load_tokenizer(tokenizer_dir)
    messages = conversation("Hoi", [])
    full = tok.apply_chat_template(
        [{k: v for k, v in m.items() if k != "tokens"} for m in messages]
    )
    got = conversation_ids(tok, messages)
    assert got.token_exact and got.ids == full
