"""`apertus-mlx filter install|status|apply|rm`: the output filter the model cards ask for.

Also `output_filter`, what `generate` wraps its events with: the matcher module is imported
only when a filter is installed, so an unfiltered `generate` starts as fast as before.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
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
    """Show the installed filter: entries, publication date, age.

    A filter that `generate` would refuse (damaged, truncated, a pattern this version cannot
    run) is an error here too, exit status 1.
    """
    from ..errors import FilterFormatError, FilterInstallError
    from ..output_filter import REFRESH_DAYS, OutputFilter, reminder

    path = _installed()
    if not path.exists():
        if as_json:
            click.echo(json.dumps({"installed": False, "path": str(path)}))
        else:
            click.echo(reminder())
        return
    try:  # the same loading as `generate`'s, so status and generate never disagree
        f = OutputFilter.from_file(path)
    except FilterFormatError as e:
        raise FilterInstallError(f"the installed output filter is unusable: {e}") from None
    head = f.data.header()
    published, patterns = f.data.published, len(head["patterns"])
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
    # Streamed, as answers are: any input (a pipe that never ends included) runs in bounded
    # memory, and text shows as soon as it is decided.
    stream = f.stream()
    for chunk in _read_chunks(file):
        sys.stdout.write(stream.feed(chunk))
    sys.stdout.write(stream.flush())


def _read_chunks(file: str) -> Iterator[str]:
    """FILE (or stdin for -) as UTF-8 text, 64 KiB at a time; read errors are UsageError
    (a failing stdout is not: it goes to the CLI's own handling)."""
    from ..errors import UsageError

    try:
        if file == "-":
            source = sys.stdin
            source.reconfigure(encoding="utf-8", errors="strict")
        else:
            source = open(file, encoding="utf-8")  # noqa: SIM115 - closed below
        with source:
            yield from iter(lambda: source.read(1 << 16), "")
    except UnicodeDecodeError:
        raise UsageError(f"{file} is not UTF-8 text") from None
    except OSError as e:
        raise UsageError(f"cannot read {file}: {e.strerror}") from None


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
