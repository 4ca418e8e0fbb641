"""`apertus-mlx filter install|status|apply|rm`: the output filter the model cards ask for.

Also `output_filter`, what `generate` wraps its events with: the matcher module is imported
only when a filter is installed, so an unfiltered `generate` starts as fast as before.
"""

from __future__ import annotations

import json
import sys
from datetime import date

import click

from ..filter_format import INSTALLED_NAME


def _installed():
    from ..paths import data_dir

    return data_dir() / INSTALLED_NAME


def output_filter(disabled: bool):
    """The installed filter for this run, loaded now so a damaged one stops the run before
    the model loads (None: none installed, or `disabled`, which is said on stderr)."""
    if disabled:
        click.echo("apertus-mlx: output filter off for this run (--no-output-filter)", err=True)
        return None
    if not _installed().exists():
        return None
    from ..errors import FilterFormatError, FilterInstallError
    from ..output_filter import OutputFilter

    try:
        return OutputFilter.installed()
    except FilterFormatError as e:  # fail closed: never show unfiltered text by accident
        raise FilterInstallError(
            f"{e} (or run with --no-output-filter to generate without it)"
        ) from None


@click.group("filter")
def filter_group() -> None:
    """The Apertus output filter: removes personal data from answers (see the README).

    The model cards ask you to apply swiss-ai's filter and refresh it every six months; get it
    from https://huggingface.co/swiss-ai/Apertus-8B-Instruct-2509. Once installed it applies to
    every answer `generate` shows, prints as JSON or saves to the history.
    """


@filter_group.command()
@click.argument("file", type=click.Path(dir_okay=False))
def install(file: str) -> None:
    """Validate FILE and install it (replaces the installed filter)."""
    from ..filter_format import read_filter, write_compiled

    data = read_filter(file)
    path = _installed()
    try:
        write_compiled(data, path)
    except OSError as e:
        from ..errors import ApertusError

        raise ApertusError(f"cannot write {path}: {e.strerror}") from None
    click.echo(
        f"installed: {_entries(data.entries)}, published {data.published.isoformat()}"
        f"{_patterns(len(data.patterns))} -> {path}"
    )


@filter_group.command()
@click.option("--json", "as_json", is_flag=True, help="One JSON object.")
def status(as_json: bool) -> None:
    """Show the installed filter: entries, publication date, age."""
    from ..filter_format import read_header
    from ..output_filter import REFRESH_DAYS, reminder

    path = _installed()
    if not path.exists():
        if as_json:
            click.echo(json.dumps({"installed": False, "path": str(path)}))
        else:
            click.echo(reminder())
        return
    head = read_header(path)
    published, patterns = head["published"], len(head["patterns"])
    age = (date.today() - published).days
    if as_json:
        info = {**head, "published": published.isoformat(), "patterns": patterns}
        click.echo(json.dumps({"installed": True, "path": str(path), **info, "age_days": age}))
        return
    entries = _entries(head["entries"])
    click.echo(f"output filter {head['version']}: {entries}{_patterns(patterns)}")
    click.echo(f"published {published.isoformat()}, {age} days ago")
    click.echo(f"matches phrases of up to {head['max_words']} words; file: {path}")
    if age > REFRESH_DAYS:
        click.echo(reminder())


@filter_group.command("apply")
@click.argument("file", type=click.Path(dir_okay=False, allow_dash=True))
@click.option(
    "-f",
    "--filter",
    "filter_file",
    type=click.Path(dir_okay=False),
    help="Use this filter file instead of the installed one (to try it before installing).",
)
def apply_cmd(file: str, filter_file: str | None) -> None:
    """Filter FILE (or stdin with -) to stdout, as answers are filtered."""
    from ..errors import UsageError
    from ..output_filter import OutputFilter

    f = OutputFilter.from_file(filter_file) if filter_file else OutputFilter.installed()
    if f is None:
        raise UsageError("no output filter installed: give one with --filter FILE")
    try:
        if file == "-":
            text = sys.stdin.read()
        else:
            with open(file, encoding="utf-8") as fh:
                text = fh.read()
    except UnicodeDecodeError:
        raise UsageError(f"{file} is not UTF-8 text") from None
    except OSError as e:
        raise UsageError(f"cannot read {file}: {e.strerror}") from None
    sys.stdout.write(f.apply(text))


@filter_group.command("rm")
def remove() -> None:
    """Remove the installed filter: answers are no longer filtered."""
    path = _installed()
    if not path.exists():
        click.echo("no output filter installed")
        return
    path.unlink()
    click.echo(f"removed {path}")


def _patterns(n: int) -> str:
    return f", {n} local pattern{'s' if n != 1 else ''}" if n else ""


def _entries(n: int) -> str:
    return f"{n:,} entr{'y' if n == 1 else 'ies'}"
