"""Tools and tool traffic in the shape every Apertus template version reads.

The 2509 template reads flat tools (`tool.name`, `tool.description`, `tool.parameters`), while
OpenAI clients send `{"type": "function", "function": {...}}`: passed through, the template
fails on the missing description. For a call's arguments some template versions write
`arguments | tojson` (a JSON string from an OpenAI client comes out double-encoded), others
`'...' + arguments` (a parsed object fails). So before any rendering, tools are made flat and
arguments become `RawJSON`: a string that concatenates as itself and that our `tojson` filter
also writes as itself, so both template styles render `{"name": {"city": "Bern"}}`.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
from typing import Any

from ..errors import UsageError

# OpenAI's rule for function names (plus "."): a name is written into the prompt as it is,
# so it must never carry template or control-token syntax.
_NAME = re.compile(r"[A-Za-z0-9_.\-]{1,64}")


class RawJSON(str):
    """JSON text to be written into a prompt verbatim, never encoded again."""


def check_name(name: Any, what: str = "tool") -> str:
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise UsageError(
            f"{what} name {name!r} is not valid: use 1-64 letters, digits, '_', '-' or '.'"
        )
    return name


def normalize_tools(tools: Iterable[Any] | None) -> list[dict] | None:
    """OpenAI (nested) or flat tool declarations -> flat ones, the shape the 2509 template
    reads; every tool gets a description (the template concatenates it unguarded)."""
    if tools is None:
        return None
    if isinstance(tools, dict | str) or not isinstance(tools, Iterable):
        raise UsageError("tools must be a list of tool declarations")
    out, seen = [], set()
    for tool in tools:
        if not isinstance(tool, dict):
            raise UsageError(f"a tool must be a JSON object, got {type(tool).__name__}")
        fn = tool.get("function", tool)
        if tool.get("type", "function") != "function" or not isinstance(fn, dict):
            raise UsageError(f"unsupported tool type {tool.get('type')!r} (only 'function')")
        name = check_name(fn.get("name"))
        if name in seen:
            raise UsageError(f"tool {name!r} is declared twice")
        seen.add(name)
        description = fn.get("description") or ""
        if not isinstance(description, str):
            raise UsageError(f"tool {name!r}: description must be a string")
        flat: dict[str, Any] = {"name": name, "description": description}
        parameters = fn.get("parameters")
        if parameters is not None:
            if not isinstance(parameters, dict):
                raise UsageError(f"tool {name!r}: parameters must be a JSON schema object")
            flat["parameters"] = parameters
        out.append(flat)
    return out


def tool_names(tools: Iterable[dict] | None) -> frozenset[str]:
    """The names of normalized tools (what a generated call may name)."""
    return frozenset(t["name"] for t in tools or ())


def raw_arguments(arguments: Any, name: str = "") -> RawJSON:
    """A call's arguments as RawJSON: a JSON string stays exactly as sent (it is what the
    model wrote, so a later prompt re-reads the same tokens); an object is written the way
    the template's `tojson` would."""
    if isinstance(arguments, RawJSON):
        return arguments
    if arguments is None:
        return RawJSON("{}")
    if isinstance(arguments, str):
        try:
            parsed = json.loads(arguments)
        except ValueError:
            raise UsageError(f"the arguments of call {name!r} are not valid JSON") from None
        if not isinstance(parsed, dict):
            raise UsageError(f"the arguments of call {name!r} must be a JSON object")
        return RawJSON(arguments)
    if isinstance(arguments, dict):
        return RawJSON(json.dumps(arguments, ensure_ascii=False))
    raise UsageError(f"the arguments of call {name!r} must be a JSON object")


def normalize_call(call: Any) -> dict:
    """An OpenAI tool call (nested) or a flat `{"name", "arguments"}` -> the nested OpenAI
    shape with `type` set (some template versions refuse a call without it)."""
    if not isinstance(call, dict):
        raise UsageError("a tool call must be a JSON object")
    fn = call.get("function", call)
    if not isinstance(fn, dict):
        raise UsageError("a tool call's function must be a JSON object")
    name = check_name(fn.get("name"), "tool call")
    out = {"type": "function", "function": {"name": name}}
    out["function"]["arguments"] = raw_arguments(fn.get("arguments"), name)
    if isinstance(call.get("id"), str):
        out["id"] = call["id"]
    return out


def content_text(content: Any) -> str:
    """A message's content as the plain string the template writes: OpenAI content parts
    (`[{"type": "text", "text": ...}]`) joined, None as empty."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        texts = []
        for part in content:
            if isinstance(part, str):
                texts.append(part)
            elif isinstance(part, dict) and part.get("type") == "text":
                texts.append(str(part.get("text", "")))
            else:
                kind = part.get("type") if isinstance(part, dict) else type(part).__name__
                raise UsageError(f"content of type {kind!r} is not supported (text only)")
        return "".join(texts)
    raise UsageError(f"message content must be a string or a list of text parts, got {content!r}")
