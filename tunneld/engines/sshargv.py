"""The command line of every ssh that carries a host's forwards: the supervised `ssh -N` and the master
connection of `tunneld login` share tunneld's options (BatchMode, no agent or X11 forwarding, keepalive,
the cipher order)."""

from __future__ import annotations

import functools
import sys
from pathlib import Path

from tunneld.config.resolve import ssh_binary
from tunneld.config.spec import TunnelSpec
from tunneld.engines import algorithms
from tunneld.errors import ConfigError

AES_GCM_CIPHERS = "aes128-gcm@openssh.com,aes256-gcm@openssh.com"


def ssh_program() -> str:
    """Return the OpenSSH client's path; a ConfigError when there is none."""
    ssh = ssh_binary()
    if ssh is None:
        raise ConfigError("the OpenSSH client ('ssh') is not on PATH", "install openssh-client or use another engine")
    return ssh


def build_argv(spec: TunnelSpec) -> list[str]:
    """Return the ssh command line that keeps `spec`'s forwards up under supervision."""
    # -v rather than LogLevel alone: ssh passes -v on to the ssh of each ProxyJump hop, whose stages count too.
    argv = [ssh_program(), "-N", "-v"]
    if spec.ssh_config:
        argv += ["-F", spec.ssh_config]
    for key, value in tunnel_options(spec).items():
        argv += ["-o", f"{key}={value}"]
    argv += ["--", spec.alias]
    return argv


def tunnel_options(spec: TunnelSpec) -> dict[str, str]:
    """Return the `-o` options every ssh that carries `spec`'s forwards runs with (the supervised `ssh -N`, and
    the master connection of `tunneld login`, which changes the few that concern prompting and multiplexing)."""
    options = {
        "ExitOnForwardFailure": "yes",
        "BatchMode": "yes",
        # An existing master would take our forwards and let this ssh exit 0 while the port works.
        "ControlMaster": "no",
        "ControlPath": "none",
        "ForkAfterAuthentication": "no",
        "StdinNull": "yes",
        "RequestTTY": "no",
        # The link is a tunnel and nothing else, whatever the host entry says for interactive use:
        # a week-long tunnel must not lend the agent or the X display to the server.
        "ForwardAgent": "no",
        "ForwardX11": "no",
        "PermitLocalCommand": "no",
        "Tunnel": "no",
        # DEBUG1 names the channel of each forwarded connection, so a refusing target can be told apart.
        "LogLevel": "DEBUG1",
    }
    if not spec.keepalive_from_user:
        options["ServerAliveInterval"] = str(spec.keepalive_interval_s)
        options["ServerAliveCountMax"] = str(spec.keepalive_count_max)
    if not spec.connect_timeout_from_user:
        options["ConnectTimeout"] = str(spec.connect_timeout_s)
    if not algorithms.user_set(spec, "ciphers") and cpu_has_aes():
        # AES-GCM runs in hardware here: 400-490 MB/s against chacha20's ~280-290 (docs/benchmarks.md).
        # '^' puts them first and keeps the rest of OpenSSH's default list.
        options["Ciphers"] = "^" + AES_GCM_CIPHERS
    return options


@functools.lru_cache(maxsize=1)
def cpu_has_aes() -> bool:
    """Return True when the CPU has AES instructions (x86 AES-NI, ARMv8 AES; every Apple Silicon Mac)."""
    if sys.platform == "darwin":
        return True
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return any(
        line.startswith(("flags", "Features")) and "aes" in line.split(":", 1)[-1].split() for line in text.splitlines()
    )
