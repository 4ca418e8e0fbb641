"""OpenAI's /v1/chat/completions and /v1/completions: a request becomes a `TurnRequest`, a
turn's events become a response or its SSE chunks (ending with `data: [DONE]`)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

from starlette.responses import JSONResponse, StreamingResponse

from .errors import ApiError
from .events import Turn, call_json, finish_reason, new_id, now, sse, usage
from .protocol import ChatRequest, CompletionRequest, Sampling

if TYPE_CHECKING:
    from starlette.requests import Request

    from ..turn import TurnRequest, TurnService
    from .scheduler import Scheduler

SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


def settings_of(req: Sampling, thinking: bool = False, system: str | None = None):
    """The turn's settings from the sampling fields (UsageError -> 400 on the model thread)."""
    from ..settings import TurnSettings

    if req.n != 1:
        raise ApiError(400, "only n=1 is supported", param="n")
    if req.seed is not None and req.seed < 0:
        raise ApiError(400, "seed must be >= 0", param="seed")
    return TurnSettings(
        temperature=req.temperature,
        top_p=req.top_p,
        top_k=req.top_k,
        min_p=req.min_p,
        repetition_penalty=req.repetition_penalty,
        seed=req.seed,
        max_tokens=req.limit(),
        stop=req.stops(),
        system=system,
        thinking=thinking,
    )


def chat_messages(req: ChatRequest) -> list[dict]:
    out = []
    for m in req.messages:
        message = m.model_dump(exclude_none=True)
        if message["role"] == "developer":
            message["role"] = "system"
        out.append(message)
    return out


def tool_choice(choice: Any) -> str | None:
    if choice is None or isinstance(choice, str):
        if choice not in (None, "auto", "none", "required"):
            raise ApiError(400, f"unknown tool_choice {choice!r}", param="tool_choice")
        return choice
    name = (choice.get("function") or {}).get("name") or choice.get("name")
    if not isinstance(name, str) or not name:
        raise ApiError(400, "tool_choice must name a function", param="tool_choice")
    return name


def thinking_of(req: ChatRequest) -> bool:
    kwargs = req.chat_template_kwargs or {}
    return bool(kwargs.get("enable_thinking")) or req.reasoning_effort not in (None, "none")


async def chat(request: Request, scheduler: Scheduler, req: ChatRequest):
    model = scheduler.names.resolve(req.model)
    settings = settings_of(req, thinking_of(req))
    messages, choice = chat_messages(req), tool_choice(req.tool_choice)
    if choice not in (None, "auto", "none") and not req.tools:
        raise ApiError(400, "tool_choice needs tools", param="tool_choice")
    k = (req.top_logprobs or 0) if req.logprobs else None

    def build(service: TurnService) -> TurnRequest:
        from ..constrained import schema_from_response_format
        from ..turn import TurnRequest

        schema = schema_from_response_format(req.response_format)
        return TurnRequest.chat(
            messages,
            settings,
            tools=req.tools,
            tool_choice=choice,
            json_schema=schema,
            frequency_penalty=req.frequency_penalty,
            presence_penalty=req.presence_penalty,
            logprobs=k,
            drop_oldest=False,
        )

    turn = Turn(scheduler, request, model, build)
    name = req.model or model
    if req.stream:
        events, first = await turn.first()
        include_usage = bool(req.stream_options and req.stream_options.include_usage)
        body = _chat_stream(events, first, name, k is not None, include_usage)
        return StreamingResponse(body, media_type="text/event-stream", headers=SSE_HEADERS)
    answer = await turn.gather()
    message: dict[str, Any] = {"role": "assistant", "content": answer.text}
    if answer.reasoning is not None:
        message["reasoning_content"] = answer.reasoning
    if answer.calls:
        message["tool_calls"] = [call_json(c) for c in answer.calls]
        message["content"] = answer.text or None
    choice_out = {
        "index": 0,
        "message": message,
        "logprobs": {"content": answer.logprobs} if k is not None else None,
        "finish_reason": answer.finish,
    }
    return JSONResponse(
        {
            "id": new_id("chatcmpl-"),
            "object": "chat.completion",
            "created": now(),
            "model": name,
            "choices": [choice_out],
            "usage": usage(answer.stats),
        }
    )


async def _chat_stream(
    events: AsyncIterator, first, model: str, with_logprobs: bool, include_usage: bool
) -> AsyncIterator[str]:
    from .. import format as fmt
    from ..generate import Done

    head = {
        "id": new_id("chatcmpl-"),
        "object": "chat.completion.chunk",
        "created": now(),
        "model": model,
    }

    def chunk(delta: dict, finish: str | None = None, logprobs: list | None = None) -> str:
        choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
        if with_logprobs:
            choice["logprobs"] = {"content": logprobs or []}
        return sse({**head, "choices": [choice]})

    yield chunk({"role": "assistant", "content": ""})
    held: list = []  # log-probabilities of tokens whose text is not out yet
    calls = 0
    done = None
    try:
        pending = [first] if first is not None else []
        async for item in _chain(pending, events):
            event, logprobs = item
            held += logprobs or []
            if isinstance(event, fmt.Chunk) and event.text:
                yield chunk({"content": event.text}, logprobs=held)
                held = []
            elif isinstance(event, fmt.Thought) and event.text:
                yield chunk({"reasoning_content": event.text}, logprobs=held)
                held = []
            elif isinstance(event, fmt.ToolCall):
                yield chunk({"tool_calls": [call_json(event, calls)]}, logprobs=held)
                calls, held = calls + 1, []
            elif isinstance(event, Done):
                done = event
    except ApiError as e:  # after the response started: said in the stream
        yield sse(e.body())
        yield sse("[DONE]")
        return
    if done is not None:
        yield chunk({}, finish_reason(done), logprobs=held)
        if include_usage:
            yield sse({**head, "choices": [], "usage": usage(done.stats)})
    yield sse("[DONE]")


async def _chain(first: list, rest: AsyncIterator) -> AsyncIterator:
    for item in first:
        yield item
    async for item in rest:
        yield item


async def completions(request: Request, scheduler: Scheduler, req: CompletionRequest):
    model = scheduler.names.resolve(req.model)
    settings = settings_of(req)
    prompt = req.prompt
    if isinstance(prompt, list) and prompt and isinstance(prompt[0], str | list):
        if len(prompt) != 1:
            raise ApiError(400, "only one prompt per request is supported", param="prompt")
        prompt = prompt[0]
    if not prompt:
        raise ApiError(400, "the prompt is empty", param="prompt")
    k = req.logprobs

    def build(service: TurnService) -> TurnRequest:
        from ..turn import TurnRequest

        ids = prompt
        if isinstance(prompt, str):
            ids = service.tokenizer.encode(prompt, add_special_tokens=True)
        return _raw(TurnRequest, ids, settings, req, k)

    turn = Turn(scheduler, request, model, build)
    name = req.model or model
    if req.stream:
        events, first = await turn.first()
        include_usage = bool(req.stream_options and req.stream_options.include_usage)
        body = _completion_stream(events, first, name, k is not None, include_usage)
        return StreamingResponse(body, media_type="text/event-stream", headers=SSE_HEADERS)
    answer = await turn.gather()
    choice = {
        "index": 0,
        "text": answer.text,
        "finish_reason": answer.finish,
        "logprobs": legacy_logprobs(answer.logprobs) if k is not None else None,
    }
    return JSONResponse(
        {
            "id": new_id("cmpl-"),
            "object": "text_completion",
            "created": now(),
            "model": name,
            "choices": [choice],
            "usage": usage(answer.stats),
        }
    )


def _raw(cls, ids, settings, req: CompletionRequest, k: int | None):
    import dataclasses

    raw = cls.raw(list(ids), settings)
    return dataclasses.replace(
        raw,
        frequency_penalty=req.frequency_penalty,
        presence_penalty=req.presence_penalty,
        logprobs=k,
    )


def legacy_logprobs(entries: list[dict]) -> dict:
    """/v1/completions' older shape of log-probabilities."""
    offsets, at = [], 0
    for e in entries:
        offsets.append(at)
        at += len(e["token"])
    return {
        "tokens": [e["token"] for e in entries],
        "token_logprobs": [e["logprob"] for e in entries],
        "top_logprobs": [{t["token"]: t["logprob"] for t in e["top_logprobs"]} for e in entries],
        "text_offset": offsets,
    }


async def _completion_stream(
    events: AsyncIterator, first, model: str, with_logprobs: bool, include_usage: bool
) -> AsyncIterator[str]:
    from .. import format as fmt
    from ..generate import Done

    head = {"id": new_id("cmpl-"), "object": "text_completion", "created": now(), "model": model}

    def chunk(text: str, finish: str | None = None, logprobs: list | None = None) -> str:
        lp = legacy_logprobs(logprobs or []) if with_logprobs else None
        return sse(
            {
                **head,
                "choices": [{"index": 0, "text": text, "logprobs": lp, "finish_reason": finish}],
            }
        )

    held: list = []
    done = None
    try:
        async for event, logprobs in _chain([first] if first else [], events):
            held += logprobs or []
            if isinstance(event, fmt.Chunk) and event.text:
                yield chunk(event.text, logprobs=held)
                held = []
            elif isinstance(event, Done):
                done = event
    except ApiError as e:
        yield sse(e.body())
        yield sse("[DONE]")
        return
    if done is not None:
        yield chunk("", finish_reason(done), logprobs=held)
        if include_usage:
            yield sse({**head, "choices": [], "usage": usage(done.stats)})
    yield sse("[DONE]")
