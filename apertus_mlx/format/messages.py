"""Conversation messages in the shapes Apertus's template reads, and answers as they are kept.

Two shapes of assistant message exist: OpenAI's (`content`, `reasoning_content`,
`tool_calls`) and Apertus's structured one (`content: {"blocks": [...]}` with blocks of type
`thoughts`, `tool_calls`, `tool_outputs`, `response`). The template renders thoughts only from
blocks and refuses a conversation that mixes string and structured assistant messages, so a
conversation with any deliberation (or any blocks) is rendered all in blocks.

An answer is kept as blocks made from the parser's events (`assistant_message`), in the order
the model wrote them, so rendering it again gives back what the model produced; the server and
the history read the OpenAI view of it (`openai_fields`).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from ..errors import UsageError
from .tools import check_name, content_text, normalize_call, raw_arguments

REASONING_FIELDS = ("reasoning_content", "thinking", "reasoning")


def _reasoning(message: dict) -> str | None:
    return next((message[k] for k in REASONING_FIELDS if message.get(k) is not None), None)


def _has_blocks(message: dict) -> bool:
    content = message.get("content")
    return isinstance(content, dict) and "blocks" in content


def normalize_messages(messages: Iterable[dict]) -> list[dict]:
    """Messages as every Apertus template version renders them: tool calls nested with their
    arguments as `RawJSON`, tool results and OpenAI content parts as plain strings, and, when
    any assistant message deliberates or uses blocks, every assistant message as blocks."""
    messages = list(messages)
    structured = any(
        m.get("role") == "assistant" and (_has_blocks(m) or _reasoning(m) is not None)
        for m in messages
    )
    out = []
    for m in messages:
        role = m.get("role")
        if role == "assistant":
            out.append(_assistant(m, structured))
        elif role == "tool":
            out.append({"role": "tool", "content": content_text(m.get("content"))})
        elif isinstance(m.get("content"), list):
            out.append({**m, "content": content_text(m["content"])})
        else:
            out.append(m)
    return out


def _assistant(message: dict, structured: bool) -> dict:
    rest = {k: v for k, v in message.items() if k not in ("content", "tool_calls")}
    for k in REASONING_FIELDS:
        rest.pop(k, None)
    calls = [normalize_call(c) for c in message.get("tool_calls") or ()]
    if not structured:
        out = {**rest, "content": content_text(message.get("content"))}
        return {**out, "tool_calls": calls} if calls else out
    if _has_blocks(message):
        blocks = [_block(b) for b in message["content"]["blocks"]]
    else:
        blocks = []
        reasoning = _reasoning(message)
        text = content_text(message.get("content"))
        if reasoning is not None:
            blocks.append({"type": "thoughts", "text": content_text(reasoning)})
        if reasoning is not None or text:  # an empty response closes the deliberation
            blocks.append({"type": "response", "text": text})
    if calls:
        blocks.append({"type": "tool_calls", "calls": [_flat_call(c) for c in calls]})
    return {**rest, "content": {"blocks": blocks}}


def _flat_call(call: dict) -> dict:
    out = {"name": call["function"]["name"], "arguments": call["function"]["arguments"]}
    return {**out, "id": call["id"]} if "id" in call else out


def _block(block: Any) -> dict:
    if not isinstance(block, dict):
        raise UsageError("an assistant block must be a JSON object")
    kind = block.get("type")
    if kind in ("thoughts", "response"):
        return {**block, "text": content_text(block.get("text"))}
    if kind == "tool_calls":
        calls = []
        for call in block.get("calls") or ():
            if not isinstance(call, dict):
                raise UsageError("a call in a tool_calls block must be a JSON object")
            name = check_name(call.get("name"), "tool call")
            calls.append({**call, "name": name, "arguments": raw_arguments(call.get("arguments"))})
        return {**block, "calls": calls}
    if kind == "tool_outputs":
        outputs = [{"output": content_text(o.get("output") if isinstance(o, dict) else o)}
                   for o in block.get("outputs") or ()]  # fmt: skip
        return {**block, "outputs": outputs}
    raise UsageError(f"unknown assistant block type {kind!r}")


def assistant_message(events: Iterable[Any]) -> dict:
    """An answer's events -> the assistant message to keep, as blocks in the model's order.

    Rendered by the template after the same prompt, it spells what the model generated: a
    closed deliberation keeps its `<|inner_suffix|>` (as a response block, empty if nothing
    followed), calls of one list stay one `tool_calls` block. Text that was a malformed call
    is kept as text. Warnings and other events are not part of the message.
    """
    from .stream import Chunk, Thought, ThoughtEnd, ThoughtStart, ToolCall

    blocks: list[dict] = []
    for event in events:
        last = blocks[-1] if blocks else None
        if isinstance(event, ThoughtStart):
            blocks.append({"type": "thoughts", "text": ""})
        elif isinstance(event, Thought):
            if last is not None and last["type"] == "thoughts":
                last["text"] += event.text
            else:
                blocks.append({"type": "thoughts", "text": event.text})
        elif isinstance(event, ThoughtEnd):
            blocks.append({"type": "response", "text": ""})
        elif isinstance(event, Chunk):
            if last is not None and last["type"] == "response":
                last["text"] += event.text
            else:
                blocks.append({"type": "response", "text": event.text})
        elif isinstance(event, ToolCall):
            call = {"name": event.name, "arguments": raw_arguments(event.arguments), "id": event.id}
            if last is not None and last["type"] == "tool_calls" and last["batch"] == event.batch:
                last["calls"].append(call)
            else:
                blocks.append({"type": "tool_calls", "calls": [call], "batch": event.batch})
    for block in blocks:
        block.pop("batch", None)
    return {"role": "assistant", "content": {"blocks": blocks}}


def openai_fields(message: dict) -> dict:
    """A kept assistant message (blocks or OpenAI shape) -> OpenAI's fields: `content` (None
    when there is no text), `reasoning_content` (None without deliberation) and `tool_calls`
    (present only when calls were made)."""
    content = message.get("content")
    if not (isinstance(content, dict) and "blocks" in content):
        out = {"content": content, "reasoning_content": _reasoning(message)}
        if message.get("tool_calls"):
            out["tool_calls"] = message["tool_calls"]
        return out
    thoughts, texts, calls = [], [], []
    for block in content["blocks"]:
        if block["type"] == "thoughts":
            thoughts.append(block["text"])
        elif block["type"] == "response":
            texts.append(block["text"])
        elif block["type"] == "tool_calls":
            for call in block["calls"]:
                fn = {"name": call["name"], "arguments": str(call["arguments"])}
                calls.append({"id": call.get("id", ""), "type": "function", "function": fn})
    out = {
        "content": "".join(texts) or None,
        "reasoning_content": "".join(thoughts) if thoughts else None,
    }
    if calls:
        out["tool_calls"] = calls
    return out
