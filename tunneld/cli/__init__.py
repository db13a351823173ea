"""The command line: parse, call one function, render, map errors to exit codes. No logic lives here.

`main` is the console script's entry point; it imports the verbs only when called, so importing one
module of this package (its options, its renderer) does not build the whole command.
"""


def main() -> None:
    """Run the `tunneld` command."""
    from tunneld.cli.main import main as run_cli

    run_cli()
