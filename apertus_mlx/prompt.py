"""The ids a conversation's next answer reads: what the model read and produced, token-exact.

Re-encoding a past answer from its text rarely gives back the tokens the model produced (a
word can be split several ways, and special-token strings in text are encoded as text), so a
cache of the earlier turns would miss from the first answer on. Here each assistant message
that carries its `tokens` stands in the prompt as exactly those tokens; only the template's own
tokens around the turns (the end of an answer, the next user turn, the generation prompt) come
from rendering. The result is checked against a full rendering of the conversation: when the
two do not spell the same text, the template renders its history differently on purpose (it
drops past deliberation, or the date in a default system prompt changed), and the full
rendering is what the model reads, as a cold start would.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class ConversationIds:
    ids: list[int]
    token_exact: bool  # False: the template re-rendered the history (see the module docstring)


def conversation_ids(
    tokenizer: Any, messages: Sequence[dict], *, enable_thinking: bool = False
) -> ConversationIds:
    """Prompt ids for `messages` (ending with the turn to answer).

    An assistant message's `tokens` (the ids the model produced for it, the end-of-turn token
    included when the answer ended with one) replace the encoding of its `content` in the
    full rendering; everything else is the template's.
    """
    plain = [{k: v for k, v in m.items() if k != "tokens"} for m in messages]

    def render(upto: int) -> list[int]:
        return tokenizer.apply_chat_template(
            plain[:upto], add_generation_prompt=True, enable_thinking=enable_thinking
        )

    full = render(len(plain))
    ids: list[int] = []
    pos = 0  # how much of `full` is accounted for
    for i, message in enumerate(messages):
        produced = list(message.get("tokens") or ())
        if message.get("role") != "assistant" or not produced:
            continue
        before = render(i)  # the answer's text follows the generation prompt of its turn
        content = message.get("content") or ""
        text = tokenizer.encode(content)
        start, end = len(before), len(before) + len(text)
        if start < pos or full[:start] != before or full[start:end] != text:
            return ConversationIds(full, False)  # the template renders this answer otherwise
        ids += full[pos:start] + produced
        pos = end
        wrote_end = tokenizer.decode(produced[:-1]) == content  # the last token is not text
        if wrote_end and pos < len(full) and produced[-1] == full[pos]:
            pos += 1  # the model wrote the template's end of turn itself
    ids += full[pos:]
    if ids != full and tokenizer.decode(ids) != tokenizer.decode(full):
        return ConversationIds(full, False)
    return ConversationIds(ids, True)


def fit_window(
    messages: list[dict], count: Callable[[list[dict]], int], window: int, reserve: int
) -> tuple[list[dict], int]:
    """Drop the oldest turns (the system prompt stays, and the last user message) until the
    prompt (`count` tokens) plus `reserve` answer tokens fits `window`; returns (messages,
    how many were dropped).

    Whole turns go, never part of one, so the prompt stays a conversation the template can
    render; the system prompt's tokens, first in the prompt, stay cached.
    """
    system = [m for m in messages[:1] if m["role"] == "system"]
    turns = messages[len(system) :]
    dropped = 0
    while len(turns) > 1 and count(system + turns) + reserve > window:
        cut = 2 if len(turns) > 2 and turns[1]["role"] == "assistant" else 1
        turns = turns[cut:]
        dropped += cut
    return system + turns, dropped
