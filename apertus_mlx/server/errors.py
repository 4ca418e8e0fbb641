"""API errors in one place, in OpenAI's shape or Anthropic's."""

from __future__ import annotations

from starlette.responses import JSONResponse

# status -> (OpenAI error type, Anthropic error type)
_TYPES = {
    400: ("invalid_request_error", "invalid_request_error"),
    401: ("authentication_error", "authentication_error"),
    404: ("not_found_error", "not_found_error"),
    405: ("invalid_request_error", "invalid_request_error"),
    413: ("invalid_request_error", "request_too_large"),
    429: ("rate_limit_error", "rate_limit_error"),
    500: ("server_error", "api_error"),
    503: ("server_error", "overloaded_error"),
}


class ApiError(Exception):
    """An answer to a request that could not be served: its status and a one-line message."""

    def __init__(
        self, status: int, message: str, param: str | None = None, code: str | None = None
    ):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code

    def body(self, anthropic: bool = False) -> dict:
        openai_type, anthropic_type = _TYPES.get(self.status, _TYPES[500])
        if anthropic:
            return {"type": "error", "error": {"type": anthropic_type, "message": self.message}}
        return {
            "error": {
                "message": self.message,
                "type": openai_type,
                "param": self.param,
                "code": self.code,
            }
        }

    def response(self, anthropic: bool = False) -> JSONResponse:
        return JSONResponse(self.body(anthropic), status_code=self.status)


def is_anthropic(path: str) -> bool:
    return path.startswith("/v1/messages")
