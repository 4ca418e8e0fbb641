"""`apertus-mlx bench`: prefill and decode speed, time to first token, memory and graph size,
optionally side by side with mlx-lm on the same checkpoint and prompt."""

from __future__ import annotations

import json

import click

from ..errors import UsageError
from . import model_option


@click.command()
@model_option()
@click.option(
    "--prompt-tokens",
    type=click.IntRange(min=1),
    default=128,
    show_default=True,
    help="Length of the random prompt.",
)
@click.option(
    "--gen-tokens",
    type=click.IntRange(min=2),
    default=64,
    show_default=True,
    help="Tokens to generate (EOS is ignored).",
)
@click.option(
    "--repeats",
    type=click.IntRange(min=1),
    default=2,
    show_default=True,
    help="Runs per engine, alternating; each metric reports its best run.",
)
@click.option("--vs-mlx-lm", is_flag=True, help="Also run mlx-lm and show ours/mlx-lm ratios.")
@click.option("--json", "as_json", is_flag=True, help='Print {"ours": {...}, "mlx_lm": {...}}.')
def bench(model_name, prompt_tokens, gen_tokens, repeats, vs_mlx_lm, as_json) -> None:
    """Time greedy generation of a fixed random prompt with MODEL.

    Reports prefill and decode tokens/s, time to first token, peak memory and the operations
    in one decode step's graph (view-only ones left out; a fused kernel counts once). Each
    run loads the model afresh; progress goes to stderr.
    """
    from ..bench import format_table, run
    from ..config import ModelArgs
    from ..hub import resolve_model

    if vs_mlx_lm:
        try:
            import mlx_lm  # noqa: F401
        except ImportError:
            raise UsageError("--vs-mlx-lm needs mlx-lm: `pip install mlx-lm`") from None
    path = resolve_model(model_name)
    context = ModelArgs.from_dir(path).max_position_embeddings
    if prompt_tokens + gen_tokens > context:  # refused before a prompt that size is built
        raise UsageError(
            f"--prompt-tokens {prompt_tokens} + --gen-tokens {gen_tokens} exceed the model's "
            f"context of {context} tokens"
        )
    results = run(
        path,
        prompt_tokens,
        gen_tokens,
        repeats=repeats,
        vs_mlx_lm=vs_mlx_lm,
        progress=lambda line: click.echo(line, err=True),
    )
    if as_json:
        click.echo(json.dumps({name: r.as_dict() for name, r in results.items()}))
    else:
        click.echo(f"{prompt_tokens} prompt tokens, {gen_tokens} generated, best of {repeats}")
        click.echo(format_table({path.name: results}))
