"""The Starlette application: routes, and around them the key check, the body limit, error
answers in the APIs' shapes and one access-log line per request."""

from __future__ import annotations

import contextlib
import hmac
import json
import sys
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from ..errors import ApertusError, UsageError
from .errors import ApiError, is_anthropic

if TYPE_CHECKING:
    from .scheduler import Scheduler

MAX_BODY_BYTES = 16 << 20


def stderr(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


async def read_json(request: Request, limit: int):
    """The request's JSON body: 413 past `limit` bytes (counted as it arrives), 400 if not
    JSON."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise ApiError(413, f"the request body is larger than {limit} bytes")
    body = bytearray()
    async for part in request.stream():
        body += part
        if len(body) > limit:
            raise ApiError(413, f"the request body is larger than {limit} bytes")
    try:
        return json.loads(bytes(body))
    except (ValueError, RecursionError) as e:
        raise ApiError(400, f"the request body is not valid JSON ({e})") from None


def build_app(
    scheduler: Scheduler,
    *,
    api_key: str | None = None,
    cors_origins: tuple[str, ...] = (),
    max_body: int = MAX_BODY_BYTES,
    log: Callable[[str], None] = stderr,
):
    from . import anthropic_api, openai_api
    from .protocol import ChatRequest, CompletionRequest, MessagesRequest, parse

    def endpoint(handler, model, anthropic: bool = False):
        async def route(request: Request):
            try:
                req = parse(model, await read_json(request, max_body))
                return await handler(request, scheduler, req)
            except ApiError as e:
                return e.response(anthropic)
            except UsageError as e:
                return ApiError(400, str(e)).response(anthropic)
            except ApertusError as e:
                return ApiError(500, str(e)).response(anthropic)

        return route

    async def models(request: Request):
        return JSONResponse({"object": "list", "data": scheduler.names.listing()})

    async def health(request: Request):
        return JSONResponse(
            {
                "status": "ok",
                "model": scheduler.loaded or scheduler.names.default,
                "loaded": scheduler.loaded is not None,
                "requests": scheduler.waiting,
            }
        )

    async def http_error(request: Request, exc: HTTPException):
        message = {
            404: f"no route {request.url.path}",
            405: f"{request.method} is not allowed on {request.url.path}",
        }
        error = ApiError(exc.status_code, message.get(exc.status_code, str(exc.detail)))
        return error.response(is_anthropic(request.url.path))

    routes = [
        Route("/v1/chat/completions", endpoint(openai_api.chat, ChatRequest), methods=["POST"]),
        Route(
            "/v1/completions", endpoint(openai_api.completions, CompletionRequest), methods=["POST"]
        ),
        Route(
            "/v1/messages",
            endpoint(anthropic_api.messages, MessagesRequest, True),
            methods=["POST"],
        ),
        Route("/v1/models", models, methods=["GET"]),
        Route("/health", health, methods=["GET"]),
    ]
    app = Starlette(routes=routes, exception_handlers={HTTPException: http_error})
    guarded = Guard(app, api_key, log)
    if cors_origins:
        from starlette.middleware.cors import CORSMiddleware

        return CORSMiddleware(
            guarded, allow_origins=list(cors_origins), allow_methods=["*"], allow_headers=["*"]
        )
    return guarded


class Guard:
    """ASGI middleware: the API key (Bearer or x-api-key), an unexpected error as a 500 with
    one logged line (never a traceback), and the access log."""

    def __init__(self, app, api_key: str | None, log: Callable[[str], None]):
        self.app, self.api_key, self.log = app, api_key, log

    def _authorized(self, scope) -> bool:
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        given = headers.get("x-api-key")
        bearer = headers.get("authorization", "")
        if given is None and bearer.lower().startswith("bearer "):
            given = bearer[7:].strip()
        return given is not None and hmac.compare_digest(given.encode(), self.api_key.encode())

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started = time.perf_counter()
        path = scope["path"]
        status: list[int | None] = [None]
        state = scope.setdefault("state", {})

        async def sending(message) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        anthropic = is_anthropic(path)
        try:
            if self.api_key and path != "/health" and not self._authorized(scope):
                error = ApiError(401, "missing or wrong API key")
                await error.response(anthropic)(scope, receive, sending)
            else:
                await self.app(scope, receive, sending)
        except Exception as e:  # a bug of ours: one line here, a 500 there, keep serving
            self.log(f"apertus-mlx: internal error: {type(e).__name__}: {e}")
            if status[0] is None:
                error = ApiError(500, "internal error")
                with contextlib.suppress(Exception):
                    await error.response(anthropic)(scope, receive, sending)
        finally:
            tokens = state.get("tokens", 0)
            seconds = time.perf_counter() - started
            self.log(f"{scope['method']} {path} {status[0] or '-'} {tokens} tokens {seconds:.3f} s")
