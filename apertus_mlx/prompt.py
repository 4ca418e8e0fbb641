"""The ids a conversation's next answer reads: what the model read and produced, token-exact.

Re-encoding a past answer from its text rarely gives back the tokens the model produced (a
word can be split several ways, and special-token strings in text are encoded as text), so a
cache of the earlier turns would miss from the first answer on. Here each assistant message
that carries its `tokens` stands in the prompt as exactly those tokens; only the template's own
tokens around the turns (the end of an answer, the next user turn, the generation prompt) come
from rendering.

It costs two renderings of the conversation, whatever its length: one with each such answer
replaced by a placeholder, which the tokenizer turns into the answer's tokens
(`Tokenizer.template_ids`), and one as it is, to check that the template writes answers as
they are. When it does not (it drops past deliberation, say), the full rendering is what the
model reads, as a cold start would. The tokenizer remembers the runs of text it encoded, so
a follow-up turn encodes only the new message: building the prompt grows with the history
only by the rendering, not by the encoding.
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
    tokenizer: Any, messages: Sequence[dict], *, enable_thinking: bool = False, **template: Any
) -> ConversationIds:
    """Prompt ids for `messages` (ending with the turn to answer).

    An assistant message's `tokens` (the ids the model produced for it, the end-of-turn token
    included when the answer ended with one) replace the encoding of its `content` in the
    rendering; everything else is the template's. `template` (tools, ...) goes to the chat
    template as it is.
    """
    kw = dict(enable_thinking=enable_thinking, **template)
    plain = [{k: v for k, v in m.items() if k != "tokens"} for m in messages]
    answers = {
        i: list(m["tokens"])
        for i, m in enumerate(messages)
        if m.get("role") == "assistant" and m.get("tokens")
    }
    if not answers:
        return ConversationIds(tokenizer.apply_chat_template(plain, True, **kw), True)
    marks = _placeholders(plain, len(answers))
    marked = [dict(m) for m in plain]
    slots: dict[str, list[int]] = {}
    for mark, (i, tokens) in zip(marks, answers.items()):
        marked[i]["content"] = mark
        slots[mark] = tokens
    rendered, ids = tokenizer.template_ids(marked, True, slots=slots, **kw)
    full_text, full = tokenizer.template_ids(plain, True, **kw)
    if _spelled_out(rendered, slots, tokenizer) != full_text:
        return ConversationIds(full, False)  # the template renders past answers otherwise
    return ConversationIds(ids, True)


def _placeholders(messages: list[dict], n: int) -> list[str]:
    """`n` distinct private-use characters that no message contains."""
    import json

    used = set(json.dumps(messages, ensure_ascii=False, default=str))
    free = (chr(c) for c in range(0x100000, 0x10FFFE) if chr(c) not in used)
    return [next(free) for _ in range(n)]


def _spelled_out(rendered: str, slots: dict[str, list[int]], tokenizer: Any) -> str:
    """The rendering with each placeholder spelled out as its tokens' text: what the full
    rendering must be if the template writes every past answer as it is."""
    import re

    pieces = re.split(f"([{''.join(slots)}])", rendered)  # text, mark, text, mark, ...
    for i in range(1, len(pieces), 2):
        tokens = slots[pieces[i]]
        text, end = tokenizer.decode(tokens), tokenizer.decode(tokens[-1:])
        # The model wrote the template's end of turn itself: it stands for the template's.
        if end and text.endswith(end) and pieces[i + 1].startswith(end):
            pieces[i + 1] = pieces[i + 1][len(end) :]
        pieces[i] = text
    return "".join(pieces)


def fit_window(
    messages: list[dict], count: Callable[[list[dict]], int], window: int, reserve: int
) -> tuple[list[dict], int]:
    """Drop the oldest turns (the system prompt stays, and the last user message) until the
    prompt (`count` tokens) plus `reserve` answer tokens fits `window`; returns (messages,
    how many were dropped).

    Whole turns go, never part of one, so the prompt stays a conversation the template can
    render; the system prompt's tokens, first in the prompt, stay cached. The fewest turns to
    drop are found by bisection: a few prompt builds, however long the history.
    """
    system = [m for m in messages[:1] if m["role"] == "system"]
    turns = messages[len(system) :]
    starts = [0] + [i for i, m in enumerate(turns) if i and m["role"] == "user"]

    def fits(k: int) -> bool:  # keeping the turns from the k-th on
        return count(system + turns[starts[k] :]) + reserve <= window

    if fits(0):
        return messages, 0
    low, high = 0, len(starts) - 1  # fits(low) is not; high keeps only the newest turn
    while high - low > 1:
        middle = (low + high) // 2
        if fits(middle):
            high = middle
        else:
            low = middle
    return system + turns[starts[high] :], starts[high]
