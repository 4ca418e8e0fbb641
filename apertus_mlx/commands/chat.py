"""`apertus-mlx chat`: the terminal UI; Textual is imported here only, so other commands
start without it."""

from __future__ import annotations

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
    ChatApp(model_name, settings).run()
