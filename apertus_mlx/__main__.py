"""`python -m apertus_mlx` is `apertus-mlx`."""

from .cli import main

main()
