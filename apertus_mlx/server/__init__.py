"""`apertus-mlx serve`: the OpenAI- and Anthropic-compatible HTTP server.

A front end like `commands/` and the chat app: it may import Starlette, uvicorn and pydantic
(the engine never does), and it touches no MLX array. Three layers, as in vLLM:

- `protocol`: the wire format as pydantic models (requests only; responses are plain dicts);
- `openai_api`, `anthropic_api`: a request becomes a `TurnRequest`, events become responses;
- `scheduler`: one thread owns the model and every MLX call, runs the queued turns in order,
  and remembers the tokens of its own answers so a client's follow-up reuses their cache.

`app` puts them on Starlette (auth, size limit, errors, access log); `commands/serve.py`
runs it on uvicorn.
"""
