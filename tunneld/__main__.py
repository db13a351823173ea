"""`python -m tunneld`: the same as the `tunneld` command."""

from tunneld.cli import main

main()
