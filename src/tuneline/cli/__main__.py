"""`python -m tuneline.cli`: the same as the `tuneline` command."""

from tuneline.cli import main

main()
