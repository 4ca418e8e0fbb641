"""`--hostfile` and `--split`: run a command's model across several hosts (see distributed.py).

    @across_hosts
    @click.command()
    ...

The decorator adds both options and, before the command's body runs, starts the other ranks
(or joins them, when started by `mlx.launch`): on rank 0 the command then runs as usual, its
model loaded part by part on every rank; on the other ranks the command body never runs.
"""

from __future__ import annotations

import functools

import click


def across_hosts(command: click.Command) -> click.Command:
    click.option(
        "--hostfile",
        type=click.Path(dir_okay=False),
        help=(
            "Run the model across the hosts in this JSON file (the format mlx.distributed_config "
            'writes: [{"ssh": "mac1", "ips": ["10.0.0.1"]}, ...]; 127.0.0.1 runs locally).'
        ),
    )(command)
    click.option(
        "--split",
        metavar="N,N,...",
        help="Layers per host, in hostfile order [default: in proportion to each host's memory].",
    )(command)
    body = command.callback

    @functools.wraps(body)
    def run(*args, hostfile: str | None = None, split: str | None = None, **kwargs):
        from ..distributed import start

        start(hostfile, split)
        return body(*args, **kwargs)

    command.callback = run
    return command
