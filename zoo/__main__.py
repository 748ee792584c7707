"""``python -m zoo`` runs the ``zoo`` command line."""

from .cli import console_main

console_main()
