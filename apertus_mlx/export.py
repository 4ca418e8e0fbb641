"""A saved conversation as Markdown (to read) or JSON (lossless: every branch, token ids).

Used by `apertus-mlx history show/export`; the chat UI can export with the same functions.
"""

from __future__ import annotations

import os
from dataclasses import asdict
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from .store import Conversation, Message, Store

FORMAT_VERSION = 1


def iso(timestamp: float) -> str:
    """Unix time as ISO 8601 in UTC, to the second."""
    moment = datetime.fromtimestamp(timestamp, tz=timezone.utc).replace(microsecond=0)
    return moment.isoformat().replace("+00:00", "Z")


def local_time(timestamp: float) -> str:
    return datetime.fromtimestamp(timestamp).strftime("%Y-%m-%d %H:%M")


def conversation_dict(conversation: Conversation) -> dict[str, Any]:
    d = asdict(conversation)
    d["created_at"], d["updated_at"] = iso(conversation.created_at), iso(conversation.updated_at)
    return d


def message_dict(message: Message) -> dict[str, Any]:
    d = asdict(message)
    d["created_at"] = iso(message.created_at)
    return d


def to_json(store: Store, conversation: Conversation) -> dict[str, Any]:
    """The whole conversation: its settings, every message of every branch (with `parent_id`)
    and the current branch's message ids."""
    return {
        "format": "apertus-mlx-conversation",
        "version": FORMAT_VERSION,
        "conversation": conversation_dict(conversation),
        "current_branch": [m.id for m in store.branch(conversation.id)],
        "messages": [message_dict(m) for m in store.messages(conversation.id)],
    }


def answer_note(message: Message) -> str:
    """How an answer ended, when that is worth saying; and a damaged row, always."""
    notes = {
        None: "incomplete: still being written, or its writer was stopped",
        "length": "cut at the token limit",
        "interrupted": "interrupted",
        "error": "ended by an error",
    }
    note = notes.get(message.finish_reason, "") if message.role == "assistant" else ""
    if message.damaged:
        note = "; ".join(filter(None, [note, f"damaged: {message.damaged}"]))
    return note


def write_atomically(path: Path, text: str) -> None:
    """Write `text` to `path` so that a failure (disk full, Ctrl+C) leaves what was there.

    The text goes to a temporary file beside `path`, reaches the disk, and is renamed over
    it; on any failure the temporary file is removed, so an old file stays as it was and a
    new one is not left empty or cut. A target that exists and is not a regular file
    (/dev/stdout, a FIFO) is written directly: renaming over it would replace the device.
    """
    target = Path(path)
    path = target.resolve() if target.is_symlink() else target  # the file, not the link
    if target.exists() and not path.is_file():  # /dev/stdout (a link to a pipe), a FIFO
        with target.open("w", encoding="utf-8") as f:
            f.write(text)
        return
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)  # the umask applies
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        if path.exists():
            os.chmod(tmp, path.stat().st_mode & 0o7777)  # the old file's permissions stay
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def to_markdown(store: Store, conversation: Conversation) -> str:
    """The current branch, readable: a header with the model and settings, then each turn."""
    c = conversation
    lines = [f"# {c.title or '(untitled)'}", ""]
    model = c.model or "unknown model"
    if c.revision:
        model += f" @ {c.revision[:12]}"
    lines.append(f"- conversation: {c.id}, {local_time(c.created_at)}")
    lines.append(f"- model: {model}" + (", thinking on" if c.thinking else ""))
    if c.settings:
        settings = ", ".join(
            f"{k} {v}" for k, v in sorted(c.settings.items()) if v not in (None, [])
        )
        lines.append(f"- settings: {settings}")
    if c.system:
        lines.append(f"- system prompt: {c.system}")
    if c.damaged:
        lines.append(f"- damaged: {c.damaged}")
    for m in store.branch(c.id):
        heading = m.role.capitalize()
        versions = store.siblings(m.id)
        if len(versions) > 1:
            heading += f" (version {[v.id for v in versions].index(m.id) + 1} of {len(versions)})"
        lines += ["", f"## {heading}", "", m.content.strip() or "(empty)"]
        note = answer_note(m)
        if note:
            lines += ["", f"*[{note}]*"]
    return "\n".join(lines) + "\n"
