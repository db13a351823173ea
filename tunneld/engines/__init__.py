"""The engines: each turns a TunnelSpec into a live Link (engines.link) that the supervisor drives.

`openssh` supervises an `ssh -N` child, `paramiko` runs the connection in-process; this module picks one.
"""

from __future__ import annotations

from tunneld.config.resolve import ssh_binary
from tunneld.config.settings import ENGINES, HostSettings, host_settings
from tunneld.engines.link import Engine
from tunneld.errors import ConfigError

ENGINE_CHOICES = ENGINES


def paramiko_available() -> bool:
    """Return True when the paramiko engine can be imported (without importing it)."""
    import importlib.util

    return importlib.util.find_spec("paramiko") is not None


def select_engine_name(requested: str, host: str | None = None, settings: HostSettings | None = None) -> str:
    """Return the engine `requested` resolves to: --engine, else the host's settings, else auto.

    auto is openssh where an `ssh` binary exists and paramiko where it does not, and paramiko for an
    on-demand host. `settings`: the host's, when the caller has read them already.
    """
    if requested not in ENGINE_CHOICES:
        raise ConfigError(f"unknown engine {requested!r}", f"choose one of: {', '.join(ENGINE_CHOICES)}")
    if settings is None and host is not None:
        settings = host_settings(host)
    on_demand = settings is not None and settings.on_demand
    if requested == "auto" and settings is not None:
        requested = settings.engine
    if on_demand and requested == "auto":
        requested = "paramiko"  # only it can listen without a link (docs/engines.md, on demand)
    if on_demand and requested == "openssh":
        raise ConfigError(
            f"{host}: on_demand = true needs the paramiko engine: ssh -N cannot adopt listeners that wait for a client",
            f'use --engine paramiko or engine = "auto" for {host} in tunneld.toml, or set on_demand = false',
        )
    if requested == "auto":
        requested = "openssh" if ssh_binary() is not None else "paramiko"
    if requested == "openssh" and ssh_binary() is None:
        raise ConfigError(
            "the openssh engine needs the OpenSSH client ('ssh'), which is not on PATH",
            "install openssh-client, or use --engine paramiko",
        )
    if requested == "paramiko" and not paramiko_available():
        raise ConfigError("the paramiko engine needs paramiko", "install it: python -m pip install paramiko")
    return requested


def make_engine(requested: str, host: str | None = None, settings: HostSettings | None = None) -> Engine:
    """Return an engine instance (its module is imported only now, so `status` never loads paramiko)."""
    if settings is None and host is not None:
        settings = host_settings(host)
    name = select_engine_name(requested, host, settings)
    if name == "paramiko":
        from tunneld.engines.paramiko import ParamikoEngine

        return ParamikoEngine(hold_s=(settings or HostSettings()).hold_connections_s)
    from tunneld.engines.openssh import OpenSshEngine

    return OpenSshEngine()
