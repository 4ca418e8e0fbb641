"""`apertus-mlx history ...`: the saved conversations, read from the same store the chat writes."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click

from ..errors import ApertusError


def _store(readonly: bool = False):
    """The history; `readonly` for the commands that only read: they never wait for a writer
    and work where the history cannot be written (see `Store.open`)."""
    from ..store import Store

    return Store.open(readonly=readonly)


class Utf8Text(click.ParamType):
    """An argument that must be text: bytes that are not UTF-8 reach Python's argv as lone
    surrogates, which SQLite cannot store or search for."""

    name = "text"

    def convert(self, value, param, ctx):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            self.fail("is not valid UTF-8", param, ctx)
        return value


UTF8 = Utf8Text()


def _echo_json(value) -> None:
    click.echo(json.dumps(value, ensure_ascii=False, indent=2))


@click.group()
def history() -> None:
    """Saved conversations: list, show, search, export, rename and delete them.

    Conversations are saved by the chat, by `apertus-mlx generate --save` and by `apertus-mlx
    serve --save`, in history.db under APERTUS_MLX_HOME when it is set, else the user data
    directory.
    """


@history.command("list")
@click.option("-n", "--limit", type=click.IntRange(min=1), default=20, show_default=True)
@click.option("--json", "as_json", is_flag=True, help="Print a JSON list, for scripts.")
def list_(limit: int, as_json: bool) -> None:
    """List conversations, the most recently updated first."""
    from ..export import conversation_dict, local_time

    with _store(readonly=True) as store:
        conversations = store.list_conversations(limit=limit)
    if as_json:
        _echo_json([conversation_dict(c) for c in conversations])
        return
    if not conversations:
        click.echo("no saved conversations yet (try `apertus-mlx generate --save ...`)", err=True)
        return
    for c in conversations:
        model = Path(c.model).name if c.model else "-"
        damaged = f"  [damaged: {c.damaged}]" if c.damaged else ""
        click.echo(
            f"{c.id}  {local_time(c.updated_at)}  {model[:24]:<24}  {c.title or ''}{damaged}"
        )


@history.command()
@click.argument("conversation_id", metavar="ID")
def show(conversation_id: str) -> None:
    """Print conversation ID's current branch, readably.

    ID is a conversation id from `history list`, or a unique prefix of 4+ characters.
    """
    from ..export import to_markdown

    with _store(readonly=True) as store:
        click.echo(to_markdown(store, store.get_conversation(conversation_id)), nl=False)


@history.command()
@click.argument("words", nargs=-1, required=True, metavar="TEXT...", type=UTF8)
@click.option("-n", "--limit", type=click.IntRange(min=1), default=20, show_default=True)
@click.option("--json", "as_json", is_flag=True, help="Print a JSON list, for scripts.")
def search(words: tuple[str, ...], limit: int, as_json: bool) -> None:
    """Find conversations whose messages or title contain every word of TEXT.

    Accents and case do not matter ("rosti" finds "Rösti"); quotes and words like AND or
    NEAR are searched as plain text. Matches are shown in [brackets], best first.
    """
    from dataclasses import asdict

    with _store(readonly=True) as store:
        hits = store.search(" ".join(words), limit=limit)
    # a conversation once, at its best hit (title and message can both match)
    seen: set[str] = set()
    hits = [h for h in hits if not (h.conversation_id in seen or seen.add(h.conversation_id))]
    if as_json:
        _echo_json([asdict(h) for h in hits])
        return
    if not hits:
        click.echo("nothing found", err=True)
        return
    for h in hits:
        where = f"{h.role}: " if h.role else "title: "
        snippet = " ".join(h.snippet.split())
        click.echo(f"{h.conversation_id}  {h.title or ''}\n    {where}{snippet}")


@history.command()
@click.argument("conversation_id", metavar="ID")
@click.option(
    "-f",
    "--format",
    "fmt",
    type=click.Choice(["md", "json"]),
    default="md",
    show_default=True,
    help="md: the current branch, to read; json: every branch, settings and token ids.",
)
@click.option("-o", "--output", type=click.Path(dir_okay=False, path_type=Path), help="Write here.")
def export(conversation_id: str, fmt: str, output: Path | None) -> None:
    """Export conversation ID to stdout, or to a file with -o.

    ID is a conversation id from `history list`, or a unique prefix of 4+ characters.
    """
    from ..export import to_json, to_markdown, write_atomically

    with _store(readonly=True) as store:
        conversation = store.get_conversation(conversation_id)
        if fmt == "md":
            text = to_markdown(store, conversation)
        else:
            text = json.dumps(to_json(store, conversation), ensure_ascii=False, indent=2) + "\n"
    if output is None:
        click.echo(text, nl=False)
        return
    try:
        write_atomically(output, text)
    except OSError as e:
        raise ApertusError(f"cannot write {output}: {e.strerror or e} (nothing changed)") from None
    click.echo(f"exported {conversation.id} to {output}", err=True)


@history.command()
@click.argument("conversation_id", metavar="ID")
@click.option("-y", "--yes", is_flag=True, help="Do not ask for confirmation.")
def rm(conversation_id: str, yes: bool) -> None:
    """Delete conversation ID and all its messages, for good.

    ID is a conversation id from `history list`, or a unique prefix of 4+ characters.
    """
    with _store() as store:
        c = store.get_conversation(conversation_id)
        if not yes and sys.stdin is None:  # started with stdin closed (`<&-`): no one to ask
            raise ApertusError("nothing deleted: stdin is closed, so nobody can confirm (--yes)")
        question = f"Delete conversation {c.id} ({c.title or 'untitled'})?"
        try:
            confirmed = yes or click.confirm(question, default=False, err=True)
        except click.exceptions.Abort:  # end of input, Ctrl+C
            confirmed = False
        if not yes and not sys.stdin.isatty():
            click.echo(err=True)  # the piped answer is not echoed: end the prompt's line
        if not confirmed:
            raise ApertusError("nothing deleted")
        from ..saved_caches import delete_conversation

        delete_conversation(store, c.id)
    click.echo(f"deleted {c.id}", err=True)


@history.command()
@click.argument("conversation_id", metavar="ID")
@click.argument("title", type=UTF8)
def rename(conversation_id: str, title: str) -> None:
    """Give conversation ID a new TITLE.

    ID is a conversation id from `history list`, or a unique prefix of 4+ characters.
    """
    from ..errors import UsageError

    if not title.strip():
        raise UsageError("the title is empty")
    with _store() as store:
        c = store.rename(conversation_id, " ".join(title.split()))
    click.echo(f"renamed {c.id} to {c.title!r}", err=True)
