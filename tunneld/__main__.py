"""`python -m tunneld`: the same as the `tunneld` command.

What service managers run at login, `python -m tunneld run HOST [--managed-by launchd]`, skips click:
it goes to the light entry point a detached `start` uses, so a tunnel that runs all day costs
~3.5 MiB less. Anything else, `--help` included, goes through the CLI.
"""

import os
import sys


def _service_argv(argv: list[str]) -> list[str] | None:
    """Return tunneld.runtime.detached's arguments for exactly what an autostart unit runs, else None."""
    if len(argv) < 2 or argv[0] != "run" or argv[1].startswith("-"):
        return None
    if argv[2:] not in ([], ["--managed-by", "launchd"]):
        return None
    ssh_config = os.environ.get("TUNNELD_SSH_CONFIG")
    if ssh_config and not (os.path.isfile(ssh_config) and os.access(ssh_config, os.R_OK)):
        return None  # the CLI explains what is wrong with it
    return [argv[1], *(["-F", ssh_config] if ssh_config else []), *argv[2:]]


_light = _service_argv(sys.argv[1:])
if _light is not None:
    from tunneld.runtime.detached import main as run_light

    sys.exit(run_light(_light))

from tunneld.cli import main  # noqa: E402 - only when the light path does not apply

main()
