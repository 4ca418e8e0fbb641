"""`apertus-mlx download`, `models` and `rm`: the local model collection."""

from __future__ import annotations

import json

import click


@click.command()
@click.argument("model")
def download(model: str) -> None:
    """Download MODEL (catalog alias or hub repo id) for offline use.

    Run again after an interruption, it fetches only the files still missing.
    """
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        DownloadColumn,
        Progress,
        TimeRemainingColumn,
        TransferSpeedColumn,
    )

    from ..hub import download as fetch
    from ..hub import repo_for

    # one bar of our own on stderr (the hub client's own bars are off), shown from the first
    # bytes on (a refused name is one line, no bar); it ends its line before "ready:"
    bar = Progress(
        "{task.description}", BarColumn(), DownloadColumn(), TransferSpeedColumn(),
        TimeRemainingColumn(), console=Console(stderr=True),
    )  # fmt: skip
    task = bar.add_task(repo_for(model), total=None)

    def report(done: int, total: int) -> None:
        if not bar.live.is_started:
            bar.start()
        bar.update(task, completed=done, total=total or None)

    try:
        path = fetch(model, progress=report)
    finally:
        if bar.live.is_started:  # stopping a bar never shown would print an empty line
            bar.stop()
    click.echo(f"ready: {path}")


@click.command("models")
@click.option("--json", "as_json", is_flag=True, help="One JSON object per line.")
def list_models(as_json: bool) -> None:
    """List the catalog of known Apertus models and what is downloaded."""
    from ..hub import catalog, local_models

    local = local_models()
    rows = []

    def row(repo: str, entry) -> dict:
        here = local.get(repo)
        complete = here is not None and here.complete
        size = here.state.total if here is not None and here.state.total else 0
        if not size:
            size = here.size_on_disk if complete else (entry.size_gb * 1e9 if entry else 0)
        return {
            "alias": entry.alias if entry else "",
            "repo": repo,
            "params": entry.params if entry else "",
            "format": entry.format if entry else "",
            "downloaded": complete,
            # partly downloaded (a cancelled or broken download): how much, to resume
            "partial_percent": here.state.percent if here and not complete else None,
            "size_gb": round(size / 1e9, 2),
            "description": entry.description if entry else "",
            "unconfirmed": entry.unconfirmed if entry else False,
        }

    for entry in catalog():
        rows.append(row(entry.repo, entry))
    known = {r["repo"] for r in rows}
    for repo in sorted(local):
        if repo not in known and "apertus" in repo.lower():
            rows.append(row(repo, None))
    if as_json:
        for row in rows:
            click.echo(json.dumps(row))
        _filter_reminder()
        return
    for r in rows:
        partial = r["partial_percent"] is not None
        mark = "✓" if r["downloaded"] else "◐" if partial else "?" if r["unconfirmed"] else " "
        size = f"{r['size_gb']:>7.2f} GB"
        note = f"partial ({r['partial_percent']}%)  " if partial else ""
        click.echo(
            f"{mark} {r['alias'] or '-':<22} {r['repo']:<48} {size}  {note}{r['description']}"
        )
    click.echo(
        "\n✓ downloaded. ◐ partly downloaded: `apertus-mlx download` resumes it."
        " ? not found on the hub yet. Get one with `apertus-mlx download ALIAS`."
    )
    _filter_reminder()


def _filter_reminder() -> None:
    """Once per `models` run, on stderr: no output filter, or one past six months old."""
    from ..output_filter import reminder

    note = reminder()
    if note:
        click.echo(f"note: {note}", err=True)


@click.command("rm")
@click.argument("model")
@click.option("-y", "--yes", is_flag=True, help="Do not ask for confirmation.")
def remove(model: str, yes: bool) -> None:
    """Delete a downloaded MODEL from the local Hugging Face cache.

    Answering no exits with status 1 ("nothing deleted"): the model is still there, so a
    script that goes on after `rm` must not take it as done.
    """
    import sys

    from ..hub import cached_repo
    from ..hub import remove as delete

    repo, path, size = cached_repo(model)  # not downloaded: say so before asking anything
    if not yes and sys.stdin is None:  # started with stdin closed (`<&-`): no one to ask
        click.echo("apertus-mlx: nothing deleted (stdin is closed: nobody can confirm; --yes)",
                   err=True)  # fmt: skip
        sys.exit(1)
    if not yes:
        try:
            confirmed = click.confirm(f"Delete {repo} ({size / 1e9:.2f} GB, {path})?")
        except click.Abort:  # end of input or Ctrl+C at the prompt
            confirmed = False
            click.echo()  # end the prompt's line
        if not confirmed:
            click.echo("apertus-mlx: nothing deleted", err=True)
            sys.exit(1)
    freed = delete(model)
    click.echo(f"deleted {repo}, {freed / 1e9:.2f} GB freed")
