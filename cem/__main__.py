"""`python -m cem`: the same as the `cem` command."""

from cem.app.cli import main

main()
