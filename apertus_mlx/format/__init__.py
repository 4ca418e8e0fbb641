"""Apertus's own format: tools as the template reads them, calls and deliberation parsed while
streaming, answers kept as the template's blocks. See docs/format.md.

Standard library only, so the tokenizer can use it without slowing `apertus-mlx generate`.
"""

from .messages import assistant_message, normalize_messages, openai_fields
from .tools import RawJSON, normalize_call, normalize_tools, tool_names

# The parser and its events load on first use: rendering a prompt needs only the rest.
_STREAM = {
    "Chunk",
    "ControlIds",
    "FormatEvent",
    "FormatParser",
    "FormatWarning",
    "Thought",
    "ThoughtEnd",
    "ThoughtStart",
    "ToolCall",
    "end_tokens",
    "filter_events",
    "parse_generation",
    "split_calls",
    "thought_open",
}


def __getattr__(name: str):
    if name in _STREAM:
        from . import stream

        return getattr(stream, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "Chunk",
    "ControlIds",
    "FormatEvent",
    "FormatParser",
    "FormatWarning",
    "RawJSON",
    "Thought",
    "ThoughtEnd",
    "ThoughtStart",
    "ToolCall",
    "assistant_message",
    "end_tokens",
    "filter_events",
    "normalize_call",
    "normalize_messages",
    "normalize_tools",
    "openai_fields",
    "parse_generation",
    "split_calls",
    "thought_open",
    "tool_names",
]
