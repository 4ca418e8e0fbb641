"""One module per CLI command, imported only when that command runs."""

import click

MODEL_HELP = (
    "Catalog alias, downloaded hub repo id or checkpoint directory (env APERTUS_MLX_MODEL)."
)


def model_option(required: bool = True, extra_help: str = ""):
    """`-m/--model`, shared by the commands that run a model."""
    return click.option(
        "-m",
        "--model",
        "model_name",
        required=required,
        envvar="APERTUS_MLX_MODEL",
        help=MODEL_HELP + extra_help,
    )
