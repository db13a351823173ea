"""`python -m tunneld.detached HOST ...`: what `tunneld start` detaches.

The same as `tunneld run`, without loading click: a long-lived supervisor saves ~3.5 MiB of RSS.
"""

from __future__ import annotations

import argparse
import sys

from tunneld.errors import TunneldError, report_error


def _echo(text: str, to_stderr: bool) -> None:
    print(text, file=sys.stderr if to_stderr else sys.stdout, flush=True)


def main(argv: list[str] | None = None) -> int:
    """Parse the arguments `start_tunnel` passes and run the supervisor."""
    from tunneld.daemon import run_tunnel

    parser = argparse.ArgumentParser(prog="python -m tunneld.detached", description=__doc__)
    parser.add_argument("host")
    parser.add_argument("-F", "--ssh-config", default=None)
    parser.add_argument("--engine", default="auto")
    parser.add_argument("--fail-fast", action="store_true")
    parser.add_argument("--notify-fd", type=int, default=None)
    parser.add_argument("--lock-fd", type=int, default=None)
    parser.add_argument("--verbose", action="store_true")
    args = parser.parse_args(argv)
    try:
        return run_tunnel(
            args.host, args.ssh_config, args.engine, args.fail_fast, args.notify_fd, args.lock_fd, args.verbose
        )
    except TunneldError as error:
        return report_error(error, _echo)


if __name__ == "__main__":
    sys.exit(main())
