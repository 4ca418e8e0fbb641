"""`apertus-mlx convert`: quantize a BF16/F16/F32 checkpoint into an MLX-quantized one."""

from __future__ import annotations

import json
from pathlib import Path

import click

from ..quantize import AFFINE_BITS, MODES


@click.command()
@click.argument("src")
@click.option(
    "--bits",
    required=True,
    type=int,
    help=f"Bits per weight of the quantized layers: {', '.join(map(str, AFFINE_BITS))} (affine).",
)
@click.option(
    "--group-size",
    type=int,
    default=None,
    help="Weights sharing one scale: 32, 64 or 128 (affine; default 64). "
    "Layers whose input size it does not divide stay unquantized.",
)
@click.option(
    "--mode",
    type=click.Choice(MODES),
    default="affine",
    show_default=True,
    help="affine integers, or the floating-point formats mxfp4 (4 bits, groups of 32), "
    "nvfp4 (4 bits, groups of 16), mxfp8 (8 bits, groups of 32).",
)
@click.option("--embedding-bits", type=int, help="Bits for the token embedding (mixed recipe).")
@click.option("--head-bits", type=int, help="Bits for the output head (mixed recipe).")
@click.option(
    "--out",
    type=click.Path(path_type=Path, file_okay=False),
    help="Output directory. Default: <src name>-<bits>bit (or -mxfp4, ...) in the "
    "current directory.",
)
@click.option("--force", is_flag=True, help="Replace --out if it exists and is not empty.")
@click.option(
    "--report",
    is_flag=True,
    help="Also measure fidelity against the source on a fixed multilingual text "
    "(KL divergence, top-1 agreement, perplexity change).",
)
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
def convert(
    src: str,
    bits: int,
    group_size: int | None,
    mode: str,
    embedding_bits: int | None,
    head_bits: int | None,
    out: Path | None,
    force: bool,
    report: bool,
    as_json: bool,
) -> None:
    """Quantize SRC (a local checkpoint directory or a downloaded hub repo id) to INT2-INT8.

    The result loads in apertus-mlx and in mlx-lm. Example, 4-bit layers with a 6-bit
    embedding and head:

    \b
        apertus-mlx convert swiss-ai/Apertus-8B-Instruct-2509 --bits 4 \\
            --embedding-bits 6 --head-bits 6
    """
    from ..hub import resolve_model
    from ..quantize import quantize_checkpoint, resolve_settings

    resolve_settings(bits, group_size, mode)  # bad flags fail before any loading
    path = resolve_model(src)
    suffix = f"{bits}bit" if mode == "affine" else mode
    out = out or Path.cwd() / f"{_base_name(src, path)}-{suffix}"
    text_ids = _report_ids(path) if report else None  # a missing tokenizer fails before work
    result = quantize_checkpoint(
        path,
        out,
        bits,
        group_size=group_size,
        mode=mode,
        embedding_bits=embedding_bits,
        head_bits=head_bits,
        force=force,
        progress=None if as_json else lambda line: click.echo(line, err=True),
    )
    rows = None
    if text_ids is not None:
        from ..fidelity import fidelity_report

        rows = fidelity_report(path, [out], text_ids)
    if as_json:
        data = result.to_dict()
        if rows is not None:
            data["report"] = rows
        click.echo(json.dumps(data))
        return
    _print_summary(result)
    if rows is not None:
        from ..fidelity import format_report

        click.echo("\nfidelity against the source (fixed multilingual text):")
        click.echo(format_report(rows))


def _base_name(src: str, path: Path) -> str:
    if Path(src).expanduser().is_dir():
        return path.resolve().name
    return src.rstrip("/").split("/")[-1]


def _report_ids(src: Path) -> list[int]:
    from ..fidelity import FIDELITY_TEXT
    from ..tokenizer import load_tokenizer

    return load_tokenizer(src).encode(FIDELITY_TEXT, add_special_tokens=True)


def _print_summary(result) -> None:
    from ..fidelity import human_size

    overrides = {k: v for k, v in result.quantization.items() if isinstance(v, dict)}
    click.echo(f"wrote {result.out}")
    click.echo(
        f"  {result.bits}-bit {result.mode}, group size {result.group_size}: "
        f"{human_size(result.size_bytes)}, {result.bits_per_weight:.2f} bits per weight"
    )
    for path, q in overrides.items():
        click.echo(f"  {path}: {q['bits']}-bit")
    if result.unquantized:
        click.echo(f"  left unquantized ({len(result.unquantized)}):")
        for path, why in result.unquantized:
            click.echo(f"    {path}: {why}")
