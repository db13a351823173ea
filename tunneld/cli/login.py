"""Credentials that need the user, in the user's terminal: `tunneld login HOST` (a password, a one-time code,
a Duo push, a FIDO touch: whatever ssh asks) and loading a key that needs a passphrase with `ssh-add`.

OpenSSH's own programs do the asking; tunneld never sees, stores or replays a secret. `login` leaves a master
connection on a private control socket (engines/master.py) that the host's supervisor adopts: a running one is
asked to retry at once (SIGUSR1), otherwise one is started.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable

from tunneld.config.credentials import agent_socket
from tunneld.config.keys import probe_agent
from tunneld.config.resolve import resolve_host
from tunneld.config.settings import host_settings
from tunneld.engines import select_engine_name
from tunneld.errors import AuthError, ConfigError
from tunneld.state.paths import HostFiles

Echo = Callable[[str, bool], None]


def on_terminal() -> bool:
    """True when both ends of the user's terminal are here: ssh and ssh-add can ask, the user can answer."""
    return sys.stdin.isatty() and sys.stderr.isatty()


def log_in(host: str, ssh_config: str | None, engine: str, echo: Echo) -> None:
    """Log in to `host` interactively, leaving a master connection its tunnel adopts (none is made while one lives);
    `starting.login_host` then hands it over."""
    from tunneld.engines.master import master_argv, master_pid, prepare_login

    spec = resolve_host(host, ssh_config)
    if select_engine_name(engine, host, host_settings(host)) != "openssh":
        raise ConfigError(
            f"`tunneld login` keeps an OpenSSH master connection, and {host} runs the paramiko engine",
            f'set engine = "openssh" for {host} in tunneld.toml (an on-demand host needs paramiko: it cannot log in '
            "interactively)",
        )
    files = HostFiles.of(host)
    if master_pid(files) is None:
        if not on_terminal():
            raise ConfigError(
                "`tunneld login` needs a terminal: ssh asks for the password, code or touch there",
                f"run `tunneld login {host}` in a terminal",
            )
        prepare_login(files)
        echo(f"{host}: logging in to {spec.user}@{spec.hostname}:{spec.port}; answer what ssh asks", True)
        done = subprocess.run(master_argv(spec, files), check=False)
        if done.returncode != 0 or master_pid(files) is None:
            from tunneld.engines.master import last_words

            said = last_words(files)
            raise AuthError(
                f"{host}: the login did not succeed (ssh exited {done.returncode}" + (f": {said})" if said else ")"),
                f"try it by hand: {spec.ssh_command}",
            )


def offer_ssh_add(error: AuthError, identity_agent: str | None, echo: Echo) -> bool:
    """A key that needs a passphrase refused a start on a terminal: load it with ssh-add in this terminal (ssh-add
    asks for the passphrase), True once the agent holds it. Without an agent, say how to get one and refuse."""
    key = error.locked[0]
    path = agent_socket(identity_agent)
    probe = probe_agent(path) if path else None
    if probe is None or not probe.reachable:
        why = (
            f"no ssh-agent of yours answers for this shell ({path}: {probe.problem})"
            if probe
            else ("no ssh-agent runs for this shell")
        )
        raise AuthError(
            f"{error.message}; and {why}",
            f'start one for this shell: eval "$(ssh-agent -s)" && ssh-add {key}; for every login session: '
            "`systemctl --user enable --now ssh-agent.socket` (or your desktop's keyring), then ssh-add it",
            error.locked,
            error.methods,
        )
    echo(f"{key} needs its passphrase: loading it into your ssh-agent (ssh-add asks; tunneld never sees it)", True)
    return subprocess.run(["ssh-add", key], check=False).returncode == 0
