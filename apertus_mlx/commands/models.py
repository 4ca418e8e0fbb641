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
    from ..hub import download as fetch

    path = fetch(model)
    click.echo(f"ready: {path}")


@click.command("models")
@click.option("--json", "as_json", is_flag=True, help="One JSON object per line.")
def list_models(as_json: bool) -> None:
    """List the catalog of known Apertus models and what is downloaded."""
    from ..hub import cached_models, catalog

    cached = cached_models()
    rows = []
    for entry in catalog():
        path, size = cached.get(entry.repo, (None, 0))
        rows.append(
            {
                "alias": entry.alias,
                "repo": entry.repo,
                "params": entry.params,
                "format": entry.format,
                "downloaded": path is not None,
                "size_gb": round((size or entry.size_gb * 1e9) / 1e9, 2),
                "description": entry.description,
                "unconfirmed": entry.unconfirmed,
            }
        )
    known = {r["repo"] for r in rows}
    for repo, (_, size) in sorted(cached.items()):
        if repo not in known and "apertus" in repo.lower():
            rows.append(
                {
                    "alias": "",
                    "repo": repo,
                    "params": "",
                    "format": "",
                    "downloaded": True,
                    "size_gb": round(size / 1e9, 2),
                    "description": "",
                    "unconfirmed": False,
                }
            )
    if as_json:
        for row in rows:
            click.echo(json.dumps(row))
        _filter_reminder()
        return
    for r in rows:
        mark = "✓" if r["downloaded"] else "?" if r["unconfirmed"] else " "
        size = f"{r['size_gb']:>7.2f} GB"
        click.echo(f"{mark} {r['alias'] or '-':<22} {r['repo']:<48} {size}  {r['description']}")
    click.echo(
        "\n✓ downloaded. ? repo id inferred from the naming, not seen on the hub yet."
        " Get one with `apertus-mlx download ALIAS`."
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
