"""`apertus-mlx serve`: OpenAI- and Anthropic-compatible HTTP on uvicorn (see `server/`)."""

from __future__ import annotations

import ipaddress
import socket

import click

from ..errors import UsageError
from . import model_option
from .across_hosts import across_hosts


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def bind(host: str, port: int) -> socket.socket:
    """A listening socket on host:port (port 0: a free one), before uvicorn takes it over."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as e:
        raise UsageError(f"--host {host}: {e.strerror}") from None
    family, _, _, _, address = infos[0]
    return socket.create_server(address[:2], family=family, backlog=128)


@across_hosts
@click.command()
@model_option(required=False, extra_help=" Loaded at start; requests may name another one.")
@click.option(
    "--host",
    default="127.0.0.1",
    show_default=True,
    help="Address to listen on; anything but loopback needs --api-key.",
)
@click.option(
    "--port",
    type=click.IntRange(0, 65535),
    default=8080,
    show_default=True,
    help="Port to listen on; 0 picks a free one.",
)
@click.option(
    "--api-key",
    envvar="APERTUS_MLX_API_KEY",
    help="Require this key (Bearer or x-api-key) [env APERTUS_MLX_API_KEY].",
)
@click.option(
    "--max-concurrent",
    type=click.IntRange(min=1),
    default=8,
    show_default=True,
    help="Requests admitted at once; more wait in a queue.",
)
@click.option(
    "--max-queue",
    type=click.IntRange(min=0),
    default=32,
    show_default=True,
    help="Requests waiting beyond --max-concurrent; one more gets 429.",
)
@click.option(
    "--cache-gb",
    type=click.FloatRange(min=0),
    default=None,
    help="Memory for prompt caches kept between requests [default: 1].",
)
@click.option(
    "--idle-unload",
    "idle_minutes",
    type=click.FloatRange(min=0, min_open=True),
    metavar="MINUTES",
    help="Free the model after this long without requests.",
)
@click.option(
    "--cors-origin",
    "cors_origins",
    multiple=True,
    help="Allow browser pages from this origin (repeatable); CORS is off otherwise.",
)
@click.option(
    "--batch/--no-batch",
    default=True,
    show_default=True,
    help="Decode concurrent answers together (continuous batching), or one at a time.",
)
@click.option("--no-output-filter", is_flag=True, help="Do not apply the installed output filter.")
@click.option(
    "--save",
    is_flag=True,
    help="Keep each chat exchange in the history (`apertus-mlx history`), as `llm` logs.",
)
def serve(
    model_name,
    host,
    port,
    api_key,
    max_concurrent,
    max_queue,
    cache_gb,
    idle_minutes,
    cors_origins,
    batch,
    no_output_filter,
    save,
) -> None:
    """Serve MODEL over HTTP: OpenAI's /v1/chat/completions, /v1/completions, /v1/models and
    Anthropic's /v1/messages, plus /health.

    Prints `listening on http://HOST:PORT` once it accepts requests. Ctrl+C or SIGTERM cut
    the running answers and stop. The installed output filter applies to every answer.
    """
    if not is_loopback(host) and not api_key:
        raise UsageError(
            f"refusing to listen on {host} without a key: give --api-key (or "
            "APERTUS_MLX_API_KEY), or keep the default --host 127.0.0.1"
        )
    if api_key is not None and not api_key.strip():
        raise UsageError("--api-key is empty")
    from ..server.models import ModelNames
    from .filter import output_filter

    names = ModelNames(model_name)  # a model that is not here fails now, before binding
    if save:  # a history that cannot be written fails now, not at each answer
        from ..store import Store

        Store.open().close()
    the_filter = output_filter(disabled=no_output_filter)
    sock = bind(host, port)  # a port in use fails now, before the model loads

    import uvicorn

    from ..server.app import build_app
    from ..server.scheduler import Scheduler

    scheduler = Scheduler(
        names,
        max_concurrent=max_concurrent,
        max_queue=max_queue,
        cache_bytes=None if cache_gb is None else int(cache_gb * (1 << 30)),
        idle_unload_s=None if idle_minutes is None else idle_minutes * 60,
        output_filter=the_filter,
        batching=batch,
        save=save,
    )
    scheduler.start(preload=names.default)
    app = build_app(scheduler, api_key=api_key, cors_origins=tuple(cors_origins))
    shown_host = f"[{host}]" if ":" in host else host
    bound_port = sock.getsockname()[1]

    class Server(uvicorn.Server):
        async def startup(self, sockets=None) -> None:
            await super().startup(sockets)
            if not self.should_exit:
                click.echo(f"listening on http://{shown_host}:{bound_port}")

        def handle_exit(self, sig, frame) -> None:
            scheduler.stop_all()  # running answers end at their next token
            super().handle_exit(sig, frame)

    config = uvicorn.Config(
        app,
        http="h11",  # the pure-Python protocol: the same on every machine
        log_level="warning",
        access_log=False,
        lifespan="off",
        timeout_graceful_shutdown=5,
    )
    try:
        Server(config).run(sockets=[sock])
    finally:
        scheduler.stop_all()
        scheduler.join(10)
