"""`python -m cli`: the same as the `durachat` command."""

from cli.main import main

main()
