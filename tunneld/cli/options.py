"""The options several verbs share (-F/--ssh-config, --engine, positive timeouts), in one place."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

import click

from tunneld.errors import ConfigError

F = TypeVar("F", bound=Callable[..., Any])
POSITIVE_S = click.FloatRange(min=0, min_open=True)
CONTEXT = {"help_option_names": ["-h", "--help"], "max_content_width": 100}


def _readable_config(ctx: click.Context, param: click.Parameter, value: str | None) -> str | None:
    """A missing or unreadable -F (or TUNNELD_SSH_CONFIG) is an error for every verb, never "no hosts"."""
    import os

    if value is not None and (not os.path.exists(value) or os.path.isdir(value) or not os.access(value, os.R_OK)):
        why = (
            "is a directory"
            if os.path.isdir(value)
            else "is not readable"
            if os.path.exists(value)
            else "does not exist"
        )
        raise ConfigError(
            f"the ssh_config file {value} {why}",
            "check the path given with -F (or in TUNNELD_SSH_CONFIG); without it, ssh's own ~/.ssh/config is read",
        )
    return value


def _ssh_config_option(help_text: str) -> Callable[[F], F]:
    def decorate(func: F) -> F:
        return click.option(
            "-F",
            "--ssh-config",
            type=str,
            default=None,
            envvar="TUNNELD_SSH_CONFIG",
            callback=_readable_config,
            help=help_text,
        )(func)

    return decorate


ssh_config_option = _ssh_config_option(
    "Read this ssh_config file instead of ~/.ssh/config (as ssh -F; also $TUNNELD_SSH_CONFIG)."
)
# Verbs that read only tunneld's own files take -F too, so one alias works everywhere.
ssh_config_unused = _ssh_config_option("Accepted like every verb; this one reads only tunneld's own files.")


def engine_option(func: F) -> F:
    """Add --engine auto|openssh."""
    from tunneld.config.settings import ENGINES

    return click.option(
        "--engine",
        type=click.Choice(ENGINES),
        default="auto",
        show_default=True,
        help="openssh supervises an `ssh -N` child; paramiko runs SSH in-process (counts bytes, holds connections "
        "during reconnects); auto: the host's setting in tunneld.toml, else openssh when ssh exists.",
    )(func)


def echo(text: str, to_stderr: bool) -> None:
    """Print one line of a verb's output: on stdout, or on stderr when `to_stderr` (errors, progress)."""
    click.echo(text, err=to_stderr)
