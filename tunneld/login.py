"""Credentials that need the user, in the user's terminal: `tunneld login HOST` (a password, a one-time code,
a Duo push, a FIDO touch: whatever ssh asks) and loading a key that needs a passphrase with `ssh-add`.

OpenSSH's own programs do the asking; tunneld never sees, stores or replays a secret. `login` leaves a master
connection on a private control socket (engines/master.py) that the host's supervisor adopts: a running one is
asked to retry at once (SIGUSR1), otherwise one is started.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable

from tunneld.config import resolve_host
from tunneld.credentials import agent_socket
from tunneld.engines import select_engine_name
from tunneld.errors import AuthError, ConfigError, TunneldError
from tunneld.keys import probe_agent
from tunneld.paths import HostFiles
from tunneld.pidfile import PidFile, process_matches
from tunneld.settings import host_settings
from tunneld.states import NEEDS_AUTH, READY_STATES
from tunneld.status import collect

Echo = Callable[[str, bool], None]
HANDOVER_TIMEOUT_S = 30.0
HANDOVER_POLL_S = 0.2


def on_terminal() -> bool:
    """True when both ends of the user's terminal are here: ssh and ssh-add can ask, the user can answer."""
    return sys.stdin.isatty() and sys.stderr.isatty()


def login_host(host: str, ssh_config: str | None, engine: str, echo: Echo) -> list[str]:
    """Log in to `host` interactively and hand the connection to its tunnel; return the lines that report it."""
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
    return hand_over(host, ssh_config, echo)


def hand_over(host: str, ssh_config: str | None, echo: Echo) -> list[str]:
    """Ask the host's supervisor to try logging in now (a new login connection, or a key just loaded), or start one
    when none runs; report the outcome of that one attempt. A host that waits for credentials again (the attempt
    was refused, or refused logins wait for the next minute) is its NeedsAuthError (exit 78), at once."""
    from tunneld.errors import error_from_dict
    from tunneld.render import forward_text
    from tunneld.safetext import printable
    from tunneld.starting import StartOptions, start_host

    before = collect(host)
    if not before.running:
        return start_host(host, StartOptions(ssh_config, "openssh", HANDOVER_TIMEOUT_S), None)
    retry_now(host)
    deadline = time.monotonic() + HANDOVER_TIMEOUT_S
    report = before
    while time.monotonic() < deadline:
        report = collect(host)
        waiting_again = report.state == NEEDS_AUTH and (report.since != before.since or report.next_try_at)
        if report.state in READY_STATES or not report.running or waiting_again:
            break
        time.sleep(HANDOVER_POLL_S)
    if report.state in READY_STATES:
        shown = ", ".join(forward_text(f) for f in report.forwards)
        return [printable(f"{host}  {report.state}  {shown}  (pid {report.pid})")]
    if report.state == NEEDS_AUTH and report.last_error:
        error = error_from_dict(report.last_error)
        if report.next_try_at:
            error.message += f" (the next login attempt waits {max(0.0, report.next_try_at - time.time()):.0f} s: "
            error.message += "logins were refused twice in the last minute)"
        raise error
    message = report.last_error.get("message") if report.last_error else None
    raise TunneldError(
        f"{host} is {report.state} after the retry" + (f": {message}" if message else ""),
        f"see `tunneld logs {host}`",
    )


def hand_agent_over(host: str, identity_agent: str | None) -> None:
    """Tell the host's supervisor which agent this shell has (it may have been started after the tunnel, at a new
    SSH_AUTH_SOCK): it uses it when it is an agent of this user's and the host takes its agent from SSH_AUTH_SOCK."""
    from tunneld.pidfile import write_json_atomic

    path = os.environ.get("SSH_AUTH_SOCK")
    if identity_agent in (None, "SSH_AUTH_SOCK") and path and probe_agent(path).reachable:
        write_json_atomic(HostFiles.of(host).agent, {"ssh_auth_sock": path})


def retry_now(host: str) -> bool:
    """Ask the host's running supervisor to retry at once (SIGUSR1), if it is really tunneld; True when asked."""
    record = PidFile(HostFiles.of(host)).read()
    if record is None or not process_matches(record.pid, record.create_time):
        return False
    os.kill(record.pid, signal.SIGUSR1)
    return True


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


def waiting_for_credentials(host: str) -> bool:
    """True when the host's supervisor waits in needs-auth."""
    return collect(host).state == NEEDS_AUTH
