"""`python -m tunneld.runtime.detached HOST ...`: what `tunneld start` detaches.

The same as `tunneld run`, without loading click (~3.5 MiB of RSS) or, when the parent names the
directories, platformdirs (~1.1 MiB): a supervisor lives all day, so its imports are kept few.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from tunneld.errors import TunneldError, report_error
from tunneld.state.paths import pin_dirs


def _echo(text: str, to_stderr: bool) -> None:
    print(text, file=sys.stderr if to_stderr else sys.stdout, flush=True)


def main(argv: list[str] | None = None) -> int:
    """Parse the arguments `start_tunnel` passes and run the supervisor."""
    from tunneld.runtime.daemon import run_tunnel

    # A fixed width: argparse would otherwise load shutil (~0.9 MiB with the compression modules it imports)
    # only to ask for the terminal's size, and a supervisor has no terminal.
    parser = argparse.ArgumentParser(
        prog="python -m tunneld.runtime.detached",
        description=__doc__,
        formatter_class=lambda prog: argparse.HelpFormatter(prog, width=100),
    )
    parser.add_argument("host")
    parser.add_argument("-F", "--ssh-config", default=None)
    parser.add_argument("--engine", default="auto")
    parser.add_argument("--fail-fast", action="store_true")
    parser.add_argument("--notify-fd", type=int, default=None)
    parser.add_argument("--lock-fd", type=int, default=None)
    parser.add_argument("--verbose", action="store_true")
    parser.add_argument("--managed-by", choices=["launchd"], default=None)
    parser.add_argument("--state-dir", type=Path, default=None)
    parser.add_argument("--config-dir", type=Path, default=None)
    args = parser.parse_args(argv)
    if args.state_dir is not None and args.config_dir is not None:
        pin_dirs(args.state_dir, args.config_dir)
    try:
        return run_tunnel(
            args.host,
            args.ssh_config,
            args.engine,
            args.fail_fast,
            args.notify_fd,
            args.lock_fd,
            args.verbose,
            args.managed_by,
        )
    except TunneldError as error:
        return report_error(error, _echo)


if __name__ == "__main__":
    sys.exit(main())
