"""`serve --save`: each chat exchange kept in the history, as `llm` logs its prompts.

Clients resend the whole conversation each turn. An exchange whose earlier messages are a
conversation saved here before (its messages and our answer, as the client sends them back)
goes on in that conversation: the new user message and the answer after the saved answer.
Anything else starts a conversation holding the messages the request carries. Exchanges are
saved once their answer has ended, on the model thread; a history that cannot be written costs
a log line, never the answer.

The history keeps system, user and assistant messages, so an exchange that carries tool
results is not saved (said once in the log). Deliberation is not kept, only the answer's text.
Which saved conversation a request continues is remembered in memory: after a restart a
continued conversation is saved as a new one.
"""

from __future__ import annotations

import hashlib
import json
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

from ..errors import ApertusError

KEPT_ROLES = ("system", "user", "assistant")


def digest(messages: list[dict]) -> str:
    """What identifies a conversation so far: its roles and texts, as a client resends them."""
    from ..format.tools import content_text

    shape = [(m.get("role"), content_text(m.get("content"))) for m in messages]
    return hashlib.sha256(json.dumps(shape, ensure_ascii=False).encode()).hexdigest()


class ExchangeLog:
    """The history the server saves exchanges in (opened at the first one)."""

    def __init__(self, log: Callable[[str], None], size: int = 4096):
        self.log = log
        self.size = size
        self._store = None
        self._leaves: OrderedDict[str, tuple[str, int]] = OrderedDict()  # digest -> answer
        self._said_tools = False

    def save(self, model_id: str, messages: list[dict], done: Any) -> None:
        """Keep `messages` (the request's, ending with the user's) and the answer `done`."""
        if any(m.get("role") not in KEPT_ROLES for m in messages):
            if not self._said_tools:
                self._said_tools = True
                self.log("apertus-mlx: --save keeps no exchange with tool results (the history "
                         "has no tool messages)")  # fmt: skip
            return
        if not messages or messages[-1].get("role") != "user":
            return
        try:
            self._save(model_id, messages, done)
        except ApertusError as e:
            self.log(f"apertus-mlx: history: this exchange was not saved: {e}")

    def _save(self, model_id: str, messages: list[dict], done: Any) -> None:
        from ..format.tools import content_text
        from ..store import FINISH_REASONS, Store

        if self._store is None:
            self._store = Store.open()
        store = self._store
        known = self._leaves.get(digest(messages[:-1]))
        if known is not None and store.exists(known[0]):
            cid, parent = known
            new = messages[-1:]
        else:
            system = messages[0] if messages[0].get("role") == "system" else None
            cid = store.create_conversation(
                model=model_id, system=content_text(system["content"]) if system else None
            ).id
            parent, new = None, messages[1:] if system else messages
        for m in new:
            if m["role"] != "system":  # the template reads a system message first only
                parent = store.add_message(
                    cid, m["role"], content_text(m.get("content")), parent
                ).id
        reason = done.stats.finish_reason
        answer = store.add_message(
            cid,
            "assistant",
            done.text,
            parent,
            tokens=done.tokens,
            finish_reason=reason if reason in FINISH_REASONS else "stop",
            stats=done.stats,
        )
        said = [*messages, {"role": "assistant", "content": done.text}]
        self._leaves[digest(said)] = (cid, answer.id)
        while len(self._leaves) > self.size:
            self._leaves.popitem(last=False)

    def close(self) -> None:
        if self._store is not None:
            self._store.close()
