"""Apertus's own format: tools as the template reads them, calls and deliberation parsed while
streaming, answers kept as the template's blocks. See docs/format.md.

Standard library only, so the tokenizer can use it without slowing `apertus-mlx generate`.
"""

from .messages import assistant_message, normalize_messages, openai_fields
from .stream import (
    Chunk,
    ControlIds,
    FormatEvent,
    FormatParser,
    FormatWarning,
    Thought,
    ThoughtEnd,
    ThoughtStart,
    ToolCall,
    end_tokens,
    filter_events,
    parse_generation,
    split_calls,
    thought_open,
)
from .tools import RawJSON, normalize_call, normalize_tools, tool_names

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
