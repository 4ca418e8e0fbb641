"""`apertus-mlx ...`: a click group whose commands are imported only when they run,
so `apertus-mlx --help` and `generate` start without loading what they do not use."""

from __future__ import annotations

import importlib
import os
import signal
import sys

import click

# name -> (module:function, one-line help shown by --help without importing the module)
COMMANDS: dict[str, tuple[str, str]] = {
    "generate": (
        "apertus_mlx.commands.generate:generate",
        "Answer one prompt, streamed to stdout.",
    ),
    "chat": ("apertus_mlx.commands.chat:chat", "Open the terminal chat UI."),
    "download": ("apertus_mlx.commands.models:download", "Download a model for offline use."),
    "models": ("apertus_mlx.commands.models:list_models", "List known and downloaded models."),
    "rm": ("apertus_mlx.commands.models:remove", "Delete a downloaded model."),
    "convert": ("apertus_mlx.commands.convert:convert", "Quantize a checkpoint to INT2-INT8."),
    "bench": ("apertus_mlx.commands.bench:bench", "Measure speed, side by side with mlx-lm."),
    "filter": (
        "apertus_mlx.commands.filter:filter_group",
        "Install or check the output filter that removes personal data.",
    ),
    "serve": (
        "apertus_mlx.commands.serve:serve",
        "Serve a model over OpenAI- and Anthropic-compatible HTTP.",
    ),
    "history": (
        "apertus_mlx.commands.history:history",
        "List, show, search, export or delete saved conversations.",
    ),
}


class LazyGroup(click.Group):
    def list_commands(self, ctx: click.Context) -> list[str]:
        return list(COMMANDS)

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        if name not in COMMANDS:
            return None
        target, _ = COMMANDS[name]
        module, attr = target.split(":")
        return getattr(importlib.import_module(module), attr)

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        with formatter.section("Commands"):
            formatter.write_dl([(name, short) for name, (_, short) in COMMANDS.items()])


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="apertus-mlx")
def cli() -> None:
    """Run the Apertus language models locally with MLX.

    MODEL is a catalog alias (see `apertus-mlx models`), a Hugging Face repo id already
    downloaded, or a local checkpoint directory.
    """


EXIT_TERMINATED = 128 + signal.SIGTERM  # 143, as if SIGTERM had ended the process
# SIGHUP: the terminal or ssh session closed. It ends a command as SIGTERM does (exit 129)
# instead of killing it where it stands, which left a conversion's lock and partial folder
# and a streamed answer marked incomplete without its cache.
TERMINATING = tuple(
    getattr(signal, name) for name in ("SIGTERM", "SIGHUP") if hasattr(signal, name)
)
_terminated_by: int | None = None


def _on_terminate(signum: int, frame: object) -> None:
    """SIGTERM and SIGHUP end a command the way Ctrl+C does: a partial answer is kept and
    flushed, a half-written conversion is removed; the exit status then names the signal."""
    note_termination(signum)
    raise KeyboardInterrupt


def note_termination(signum: int) -> None:
    """Signal `signum` ends this run: `main` exits with 128 + signum, whatever else fails while
    the command winds down. For commands with handlers of their own (the chat)."""
    global _terminated_by
    _terminated_by = signum


def main() -> None:
    """Entry point: typed errors become one line on stderr and an exit status, not a traceback."""
    for sig in TERMINATING:
        if signal.getsignal(sig) is not signal.SIG_IGN:  # `nohup` keeps a hangup ignored
            signal.signal(sig, _on_terminate)
    try:
        _main()
    except SystemExit as e:
        if _terminated_by is not None and e.code not in (0, None):
            sys.exit(128 + _terminated_by)
        raise
    except BaseException:
        # After a hangup stderr may be gone too: whatever failed while ending, the status says
        # the signal ended it.
        if _terminated_by is not None:
            sys.exit(128 + _terminated_by)
        raise


def _fail(message: str, code: int) -> None:
    click.echo(f"apertus-mlx: error: {message}", err=True)
    sys.exit(code)


def _main() -> None:
    from .errors import ApertusError

    if sys.stdout is None:  # started with stdout closed (`>&-`): an answer would be lost
        _fail("standard output is closed: nowhere to write", 1)
    try:
        cli.main(standalone_mode=False)
        sys.stdout.flush()  # a full disk or a closed descriptor shows here, not at exit
    except click.exceptions.Abort:
        sys.exit(130)
    except BrokenPipeError:  # `| head`: the reader has what it wanted
        sys.stderr.close()
        sys.exit(0)
    except OSError as e:  # disk full, permissions, a closed descriptor: runtime, one line
        try:
            sys.stdout.flush()
        except (OSError, ValueError):
            sys.stdout = None  # broken: exit-time flushing must not retry and print a trace
        where = f" ({e.filename})" if e.filename else ""
        _fail(f"{e.strerror or e}{where}", 1)
    except click.ClickException as e:  # bad flags: one line too, with where to look
        message = " ".join(e.format_message().split())
        if isinstance(e, click.UsageError) and e.ctx is not None:
            message += f" (see `{e.ctx.command_path} --help`)"
        _fail(message, e.exit_code)
    except ApertusError as e:
        click.echo(f"apertus-mlx: error: {e}", err=True)
        sys.exit(e.exit_code)
    except KeyboardInterrupt:
        sys.exit(130)
    except click.exceptions.Exit as e:
        sys.exit(e.exit_code)
    except Exception as e:  # a bug of ours: still one line, the traceback on request
        if os.environ.get("APERTUS_MLX_DEBUG"):
            raise
        click.echo(
            f"apertus-mlx: internal error: {type(e).__name__}: {e} "
            "(set APERTUS_MLX_DEBUG=1 for the traceback)",
            err=True,
        )
        sys.exit(1)
