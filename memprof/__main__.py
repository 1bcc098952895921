"""``python -m memprof``: the same CLI as the ``memprof`` console script."""

from .cli import main

main()
