"""Anthropic's /v1/messages: system, text / thinking / tool_use / tool_result blocks, tools,
`stream` with its event types. Read into the same turns as OpenAI's chat."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

from starlette.responses import JSONResponse, StreamingResponse

from .errors import ApiError
from .events import Turn, new_id, sse_event
from .openai_api import SSE_HEADERS, _chain
from .protocol import MessagesRequest

if TYPE_CHECKING:
    from starlette.requests import Request

    from ..turn import TurnRequest, TurnService
    from .scheduler import Scheduler


def _text(blocks: Any, where: str) -> str:
    if isinstance(blocks, str):
        return blocks
    texts = []
    for b in blocks or ():
        if not isinstance(b, dict) or b.get("type") != "text":
            kind = b.get("type") if isinstance(b, dict) else type(b).__name__
            raise ApiError(400, f"{where}: unsupported content block {kind!r} (text only here)")
        texts.append(str(b.get("text", "")))
    return "".join(texts)


def messages_of(req: MessagesRequest) -> list[dict]:
    """Anthropic's messages as the OpenAI-shaped ones the turn service reads."""
    out: list[dict] = []
    if req.system:
        out.append({"role": "system", "content": _text(req.system, "system")})
    for i, m in enumerate(req.messages):
        where = f"messages.{i}"
        if isinstance(m.content, str):
            out.append({"role": m.role, "content": m.content})
            continue
        text, thinking, calls, results = [], [], [], []
        for b in m.content:
            kind = b.get("type")
            if kind == "text":
                text.append(str(b.get("text", "")))
            elif kind == "thinking" and m.role == "assistant":
                thinking.append(str(b.get("thinking", "")))
            elif kind == "redacted_thinking":
                continue
            elif kind == "tool_use" and m.role == "assistant":
                arguments = json.dumps(b.get("input") or {}, ensure_ascii=False)
                calls.append(
                    {
                        "id": b.get("id"),
                        "type": "function",
                        "function": {"name": b.get("name"), "arguments": arguments},
                    }
                )
            elif kind == "tool_result" and m.role == "user":
                content = b.get("content", "")
                results.append(
                    {
                        "role": "tool",
                        "tool_call_id": b.get("tool_use_id"),
                        "content": _text(content, where),
                    }
                )
            else:
                raise ApiError(400, f"{where}: unsupported content block {kind!r}")
        if m.role == "assistant":
            message: dict[str, Any] = {"role": "assistant", "content": "".join(text)}
            if thinking:
                message["reasoning_content"] = "".join(thinking)
            if calls:
                message["tool_calls"] = calls
            out.append(message)
        else:
            out += results
            if text or not results:
                out.append({"role": "user", "content": "".join(text)})
    return out


def tool_choice_of(choice: dict | None) -> str | None:
    if choice is None:
        return None
    kind = choice.get("type")
    if kind in ("auto", "none"):
        return kind
    if kind == "any":
        return "required"
    if kind == "tool" and isinstance(choice.get("name"), str):
        return choice["name"]
    raise ApiError(400, f"unknown tool_choice {choice!r}", param="tool_choice")


def stop_reason(done) -> str:
    if done.tool_calls:
        return "tool_use"
    return "max_tokens" if done.stats.finish_reason == "length" else "end_turn"


def _usage(stats) -> dict:
    return {
        "input_tokens": stats.prompt_tokens - stats.cached_tokens,
        "output_tokens": stats.generated_tokens,
        "cache_read_input_tokens": stats.cached_tokens,
        "cache_creation_input_tokens": 0,
    }


async def messages(request: Request, scheduler: Scheduler, req: MessagesRequest):
    from ..settings import TurnSettings

    model = scheduler.names.resolve(req.model)
    thinking = (req.thinking or {}).get("type") == "enabled"
    settings = TurnSettings(
        temperature=req.temperature,
        top_p=req.top_p,
        top_k=req.top_k,
        max_tokens=req.max_tokens,
        stop=tuple(req.stop_sequences or ()),
        thinking=thinking,
    )
    history = messages_of(req)
    tools = [
        {"name": t.name, "description": t.description or "", "parameters": t.input_schema}
        for t in req.tools or ()
    ]
    choice = tool_choice_of(req.tool_choice)

    def build(service: TurnService) -> TurnRequest:
        from ..turn import TurnRequest

        return TurnRequest.chat(
            history, settings, tools=tools or None, tool_choice=choice, drop_oldest=False
        )

    turn = Turn(scheduler, request, model, build)
    name = req.model or model
    if req.stream:
        events, first = await turn.first()
        return StreamingResponse(
            _stream(events, first, name), media_type="text/event-stream", headers=SSE_HEADERS
        )
    answer = await turn.gather()
    content: list[dict] = []
    if answer.reasoning is not None:
        content.append({"type": "thinking", "thinking": answer.reasoning, "signature": ""})
    if answer.text or not answer.calls:
        content.append({"type": "text", "text": answer.text})
    for c in answer.calls:
        content.append({"type": "tool_use", "id": c.id, "name": c.name, "input": c.parsed})
    done_reason = (
        "tool_use" if answer.calls else ("max_tokens" if answer.finish == "length" else "end_turn")
    )
    return JSONResponse(
        {
            "id": new_id("msg_"),
            "type": "message",
            "role": "assistant",
            "model": name,
            "content": content,
            "stop_reason": done_reason,
            "stop_sequence": None,
            "usage": _usage(answer.stats),
        }
    )


async def _stream(events: AsyncIterator, first, model: str) -> AsyncIterator[str]:
    from .. import format as fmt
    from ..generate import Done
    from ..turn import Started

    prompt = first[0].prompt_tokens if first and isinstance(first[0], Started) else 0
    yield sse_event(
        "message_start",
        {
            "type": "message_start",
            "message": {
                "id": new_id("msg_"),
                "type": "message",
                "role": "assistant",
                "model": model,
                "content": [],
                "stop_reason": None,
                "stop_sequence": None,
                "usage": {"input_tokens": prompt, "output_tokens": 0},
            },
        },
    )
    index, open_kind = -1, None

    def start(kind: str, block: dict) -> str:
        nonlocal index, open_kind
        index, open_kind = index + 1, kind
        return sse_event(
            "content_block_start",
            {"type": "content_block_start", "index": index, "content_block": block},
        )

    def stop() -> str:
        nonlocal open_kind
        open_kind = None
        return sse_event("content_block_stop", {"type": "content_block_stop", "index": index})

    def delta(d: dict) -> str:
        return sse_event(
            "content_block_delta", {"type": "content_block_delta", "index": index, "delta": d}
        )

    done = None
    try:
        async for event, _ in _chain([first] if first else [], events):
            if isinstance(event, fmt.Thought) and event.text:
                if open_kind != "thinking":
                    if open_kind:
                        yield stop()
                    yield start("thinking", {"type": "thinking", "thinking": "", "signature": ""})
                yield delta({"type": "thinking_delta", "thinking": event.text})
            elif isinstance(event, fmt.Chunk) and event.text:
                if open_kind != "text":
                    if open_kind:
                        yield stop()
                    yield start("text", {"type": "text", "text": ""})
                yield delta({"type": "text_delta", "text": event.text})
            elif isinstance(event, fmt.ToolCall):
                if open_kind:
                    yield stop()
                yield start(
                    "tool_use",
                    {"type": "tool_use", "id": event.id, "name": event.name, "input": {}},
                )
                yield delta({"type": "input_json_delta", "partial_json": event.arguments})
                yield stop()
            elif isinstance(event, Done):
                done = event
    except ApiError as e:
        yield sse_event("error", e.body(anthropic=True))
        return
    if open_kind:
        yield stop()
    if done is not None:
        if index < 0:  # no block at all: an empty text block, as Anthropic sends
            yield start("text", {"type": "text", "text": ""})
            yield stop()
        yield sse_event(
            "message_delta",
            {
                "type": "message_delta",
                "delta": {"stop_reason": stop_reason(done), "stop_sequence": None},
                "usage": {"output_tokens": done.stats.generated_tokens},
            },
        )
        yield sse_event("message_stop", {"type": "message_stop"})
