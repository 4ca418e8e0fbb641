"""Between the model thread and a handler: a turn's events as an async iterator, usage, and
the common parts of a finished answer."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from .errors import ApiError
from .scheduler import Work

if TYPE_CHECKING:
    from starlette.requests import Request

    from ..turn import TurnRequest, TurnService
    from .scheduler import Scheduler


def new_id(prefix: str) -> str:
    return f"{prefix}{uuid.uuid4().hex[:24]}"


def now() -> int:
    return int(time.time())


@dataclass
class Answer:
    """What a turn said, gathered from its events (`gather`) for a non-streamed response."""

    text: str = ""
    reasoning: str | None = None
    calls: list = field(default_factory=list)
    logprobs: list[dict] = field(default_factory=list)
    stats: Any = None
    finish: str = "stop"  # OpenAI's: stop, length, tool_calls


def finish_reason(done) -> str:
    if done.tool_calls:
        return "tool_calls"
    return "length" if done.stats.finish_reason == "length" else "stop"


def usage(stats) -> dict:
    if stats is None:
        return {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0}
    return {
        "prompt_tokens": stats.prompt_tokens,
        "completion_tokens": stats.generated_tokens,
        "total_tokens": stats.prompt_tokens + stats.generated_tokens,
        "prompt_tokens_details": {"cached_tokens": stats.cached_tokens},
    }


def call_json(call, index: int | None = None) -> dict:
    out = {
        "id": call.id,
        "type": "function",
        "function": {"name": call.name, "arguments": call.arguments},
    }
    return out if index is None else {"index": index, **out}


class Turn:
    """A submitted turn seen from the event loop: `events()` yields (event, logprobs) and
    raises ApiError; the first event is awaited before a response starts, so an input the
    turn refuses is still an HTTP error."""

    def __init__(
        self,
        scheduler: Scheduler,
        request: Request,
        model: str,
        build: Callable[[TurnService], TurnRequest],
    ):
        self.request = request
        self.work = Work(model, build, asyncio.get_running_loop())
        scheduler.submit(self.work)
        self._watch: asyncio.Task | None = None
        self.done = None

    async def _watch_disconnect(self) -> None:
        """The client hung up: the answer stops at its next token (or never starts), its
        place frees. (A streamed response, once started, listens itself and closes
        `events`.)"""
        try:
            while True:
                message = await self.request.receive()
                if message["type"] == "http.disconnect":
                    self.work.stop.set()
                    return
        except (asyncio.CancelledError, RuntimeError, OSError):
            return

    async def events(self) -> AsyncIterator[tuple[Any, list | None]]:
        from ..generate import Done

        try:
            while True:
                # A queue that is never empty never suspends `get`: give the other
                # requests their turn on the event loop after each event.
                await asyncio.sleep(0)
                kind, value, logprobs = await self.work.queue.get()
                if kind == "end":
                    return
                if kind == "error":
                    raise value
                if isinstance(value, Done):
                    self.done = value
                    self.request.state.tokens = (
                        value.stats.prompt_tokens + value.stats.generated_tokens
                    )
                yield value, logprobs
        finally:
            self.work.stop.set()  # a consumer that went away ends the answer
            if self._watch is not None:
                self._watch.cancel()

    async def first(self) -> tuple[AsyncIterator, tuple[Any, list | None] | None]:
        """(the events, the first of them), raising the turn's refusal as ApiError."""
        events = self.events()
        # Until the response starts, nobody else listens for a hang-up (a request waiting
        # in the queue); then the streamed response does.
        self._watch = asyncio.create_task(self._watch_disconnect())
        try:
            return events, await events.__anext__()
        except StopAsyncIteration:
            return events, None
        finally:
            self._watch.cancel()
            self._watch = None

    async def gather(self) -> Answer:
        from .. import format as fmt
        from ..generate import Done

        answer = Answer()
        thoughts: list[str] = []
        self._watch = asyncio.create_task(self._watch_disconnect())
        async for event, logprobs in self.events():
            answer.logprobs += logprobs or []
            if isinstance(event, fmt.Thought):
                thoughts.append(event.text)
            elif isinstance(event, Done):
                answer.text, answer.calls, answer.stats = event.text, event.tool_calls, event.stats
                answer.reasoning = event.reasoning
                answer.finish = finish_reason(event)
        if answer.stats is None:
            raise ApiError(500, "the answer ended without a result")
        return answer


def sse(data: dict | str) -> str:
    body = data if isinstance(data, str) else json.dumps(data, ensure_ascii=False)
    return f"data: {body}\n\n"


def sse_event(name: str, data: dict) -> str:
    return f"event: {name}\ndata: {json.dumps(data, ensure_ascii=False)}\n\n"
