"""`apertus-mlx chat`: the terminal UI; Textual is imported here only, so other commands
start without it."""

from __future__ import annotations

import contextlib
import errno
import os
import signal
import sys
from collections.abc import Iterator

import click

from . import model_option
from .across_hosts import across_hosts

# The app quits in a second or two; these are for one that is stuck (see _watch_the_way_out).
STUCK_AFTER_SIGNAL_S = 30.0
AFTER_HANGUP_S = 8.0


@across_hosts
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
    down with the model thread still in MLX: the process aborted at exit ("terminate called
    without an active exception"), the answer stayed "incomplete" and no cache was saved.
    Before the loop runs (or after), those handlers apply as usual.
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
        if not received:
            _watch_the_way_out(128 + signum)
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


def _terminal_gone() -> bool:
    """True once our terminal hung up (its window or ssh session closed): every operation on
    it then fails with EIO."""
    import termios

    for fd in (2, 1, 0):  # not `os.isatty`: it says False for a terminal that hung up
        try:
            termios.tcgetattr(fd)
        except termios.error as e:  # ENOTTY: not a terminal, EBADF: closed
            if e.args and e.args[0] == errno.EIO:
                return True
    return False


def _watch_the_way_out(status: int) -> None:
    """While the app quits: once the terminal is gone, its last screens go to /dev/null, and
    the process ends with `status` AFTER_HANGUP_S later if the app is still running; with a
    terminal, it ends STUCK_AFTER_SIGNAL_S after the signal if the app is stuck.

    A hangup may close the terminal before or after the signal arrives (tmux signals first,
    the kernel closes first), so this watches rather than checks once. Textual's writer thread
    dies on the first EIO and its bounded queue then blocks the event loop for good (the
    common case under load). The answer and its cache are written before that point (the
    app's unmount stops the answer and waits for the model thread), so ending then loses
    nothing.
    """
    import threading
    import time

    def watch() -> None:
        deadline = time.monotonic() + STUCK_AFTER_SIGNAL_S
        while time.monotonic() < deadline:
            if _terminal_gone():
                null = os.open(os.devnull, os.O_RDWR)
                for fd in (0, 1, 2):
                    os.dup2(null, fd)
                os.close(null)
                deadline = min(deadline, time.monotonic() + AFTER_HANGUP_S)
                break
            time.sleep(0.1)
        time.sleep(max(0.0, deadline - time.monotonic()))
        os._exit(status)

    threading.Thread(target=watch, name="quit-watchdog", daemon=True).start()
