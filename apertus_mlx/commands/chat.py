"""`apertus-mlx chat`: the terminal UI; Textual is imported here only, so other commands
start without it."""

from __future__ import annotations

import contextlib
import signal
import sys
from collections.abc import Iterator

import click

from . import model_option


@click.command()
@model_option(
    required=False,
    extra_help=" Without it, the last model used; on a first start, the models screen.",
)
@click.option("-s", "--system", help="System prompt (replaces the model's default one).")
@click.option(
    "-t",
    "--temp",
    "temperature",
    type=click.FloatRange(min=0),
    help="Temperature; 0 is greedy [default: the checkpoint's, else 0.8].",
)
@click.option(
    "--top-p",
    type=click.FloatRange(min=0, max=1, min_open=True),
    help="Nucleus sampling mass [default: the checkpoint's, else 0.9].",
)
@click.option(
    "-n",
    "--max-tokens",
    type=click.IntRange(min=1),
    help="Most tokens per answer [default: 4096, within the model's context].",
)
def chat(model_name, system, temperature, top_p, max_tokens) -> None:  # fmt: skip
    """Chat with MODEL in the terminal; conversations are kept in the history. Enter sends,
    ctrl+j starts a new line, Esc stops the answer, ctrl+o opens the models, ctrl+s the
    settings, F1 lists every key, ctrl+p opens the command palette, ctrl+q quits.

    Options given here become the defaults of new conversations for this run."""
    from apertus_mlx_app.app import ChatApp
    from apertus_mlx_app.settings import AppConfig, ChatSettings

    settings = None
    if any(v is not None for v in (system, temperature, top_p, max_tokens)):
        try:
            base = AppConfig.load().defaults
        except Exception:  # noqa: BLE001 - the app reports a damaged config itself
            base = ChatSettings()
        settings = base.with_(
            **{k: v for k, v in dict(system=system, temperature=temperature, top_p=top_p,
                                     max_tokens=max_tokens).items() if v is not None}
        )  # fmt: skip
    app = ChatApp(model_name, settings)
    with quit_on_termination(app) as received:
        app.run()
    if received:
        sys.exit(128 + received[0])


@contextlib.contextmanager
def quit_on_termination(app) -> Iterator[list[int]]:
    """While the app runs, SIGTERM and SIGHUP (a closed terminal or ssh session) quit it as
    ctrl+q does: the answer stops and is stored as interrupted, the model thread finishes and
    parks, Textual restores the terminal; the command then exits 128 + the signal.

    The CLI's own handlers raise KeyboardInterrupt, which inside Textual's event loop tears it
    down with the model thread still in MLX: the process aborted at exit, the answer stayed
    "incomplete" and, on a hangup, the terminal stayed on the alternate screen. Before the
    loop runs (or after), those handlers apply as usual.
    """
    import asyncio

    from ..cli import TERMINATING, note_termination

    received: list[int] = []
    previous = {sig: signal.getsignal(sig) for sig in TERMINATING}

    def on_signal(signum: int, frame: object) -> None:
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:  # the app is not running (yet): end as any command does
            handler = previous[signum]
            if callable(handler):
                handler(signum, frame)
            return
        note_termination(signum)
        received.append(signum)
        loop.call_soon_threadsafe(app.exit)

    for sig, handler in previous.items():
        if handler is not signal.SIG_IGN:  # `nohup` keeps a hangup ignored
            signal.signal(sig, on_signal)
    try:
        yield received
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
