"""Config edits that have not reached a running tunnel: named when `start` meets the running host, applied by
`tunneld reload HOST` (SIGHUP to its supervisor) without dropping the link where nothing needs a new one."""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Callable

from tunneld.config.diff import Summary, differences, parse_summary, summary
from tunneld.errors import NotRunningError, TunneldError
from tunneld.state.paths import HostFiles
from tunneld.state.pidfile import PidFile, process_matches, read_json

Echo = Callable[[str, bool], None]
RELOAD_TIMEOUT_S = 20.0
RELOAD_POLL_S = 0.1


def running_config(host: str) -> Summary | None:
    """What the running tunnel of `host` was configured with (its state file), None when unknown."""
    try:
        state = read_json(HostFiles.of(host).state, host) or {}
    except TunneldError:
        return None
    return parse_summary(state.get("config"))


def config_drift(host: str, ssh_config: str | None) -> list[str]:
    """How `host`'s ssh_config and tunneld.toml differ now from what its running tunnel uses ([] when alike)."""
    from tunneld.config.resolve import resolve_host
    from tunneld.config.settings import host_settings

    running = running_config(host)
    if running is None:
        return []
    return differences(running, summary(resolve_host(host, ssh_config), host_settings(host)))


def drift_note(host: str, changes: list[str]) -> str:
    """The sentence `start` adds for a running host whose configuration changed since it started."""
    return f"running with an older config: {'; '.join(changes)}; `tunneld reload {host}` applies it"


def reload_host(host: str, ssh_config: str | None, echo: Echo) -> list[str]:
    """Check the new configuration here (a broken one is reported and not sent), tell the running supervisor to
    apply it, and report what it did."""
    from tunneld.config.resolve import resolve_host
    from tunneld.config.settings import host_settings
    from tunneld.runtime.health import check_health_keys

    files = HostFiles.of(host)
    record = PidFile(files).read()
    if record is None or not process_matches(record.pid, record.create_time):
        raise NotRunningError(f"{host} is not running: nothing to reload", f"start it with: tunneld start {host}")
    spec, settings = resolve_host(host, ssh_config), host_settings(host)
    check_health_keys(spec, settings)
    running = running_config(host) or {}
    wanted = summary(spec, settings)
    changes = differences(running, wanted)
    if not changes:
        return [f"{host}  nothing changed: the running tunnel (pid {record.pid}) already uses this configuration"]
    for change in changes:
        echo(f"  {change}", True)
    os.kill(record.pid, signal.SIGHUP)
    deadline = time.monotonic() + RELOAD_TIMEOUT_S
    while time.monotonic() < deadline:
        state = read_json(files.state, host) or {}
        listed = state.get("config_changed")
        pending = [item for item in listed if isinstance(item, str)] if isinstance(listed, list) else []
        if parse_summary(state.get("config")) == wanted:
            return [f"{host}  reloaded (pid {record.pid})"]  # the differences are on stderr just above
        if any(item.startswith(("not applied", "applies at a restart")) for item in pending):
            raise TunneldError(f"{host}: the new configuration was not applied: {'; '.join(pending)}",
                               f"see `tunneld logs {host}`")  # fmt: skip
        time.sleep(RELOAD_POLL_S)
    raise TunneldError(
        f"{host} did not take the new configuration within {RELOAD_TIMEOUT_S:g} s", f"see `tunneld logs {host}`"
    )
