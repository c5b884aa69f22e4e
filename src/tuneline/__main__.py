"""`python -m tuneline`: the same as the `tuneline` command."""

from tuneline.cli import main

main()
