"""`python -m apertus_mlx.rank`: a rank after the first, as `launch.py` starts it on each host.

It joins the group its environment names and serves rank 0 until told to stop; it reads no
prompt and prints nothing but its own failure.
"""

from __future__ import annotations

import sys


def main() -> None:
    from .distributed import launched_as_rank, start
    from .errors import ApertusError

    if not launched_as_rank():
        print("apertus-mlx: error: apertus_mlx.rank is started by `--hostfile`", file=sys.stderr)
        sys.exit(2)
    try:
        start()  # ranks after the first serve in here and exit
    except ApertusError as e:
        print(f"apertus-mlx: error: {e}", file=sys.stderr)
        sys.exit(e.exit_code)
    print("apertus-mlx: error: apertus_mlx.rank cannot be rank 0", file=sys.stderr)
    sys.exit(2)


if __name__ == "__main__":
    main()
