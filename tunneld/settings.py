"""tunneld's own per-host settings: a TOML file under the user's config directory, validated on read."""

from __future__ import annotations

import sys
from dataclasses import dataclass, fields
from pathlib import Path

from tunneld.errors import ConfigError
from tunneld.paths import config_dir

ENGINES = ("auto", "openssh", "paramiko")
SETTINGS_FILE = "tunneld.toml"


@dataclass(frozen=True)
class HostSettings:
    """Settings for one host: the file's top level gives defaults, `[hosts.NAME]` overrides them."""

    engine: str = "auto"
    hold_connections_s: float = 10.0


def settings_path() -> Path:
    """Return the settings file's path (it need not exist)."""
    return config_dir() / SETTINGS_FILE


def _validate(table: dict[str, object], where: str, base: HostSettings) -> HostSettings:
    known = {f.name for f in fields(HostSettings)}
    values: dict[str, object] = {f.name: getattr(base, f.name) for f in fields(HostSettings)}
    for key, value in table.items():
        if key not in known:
            raise ConfigError(f"{where}: unknown setting {key!r}", f"known settings: {', '.join(sorted(known))}")
        if key == "engine" and value not in ENGINES:
            raise ConfigError(f"{where}: engine must be one of {', '.join(ENGINES)}, not {value!r}")
        if key == "hold_connections_s" and (
            not isinstance(value, (int, float)) or isinstance(value, bool) or not 0 <= value <= 3600
        ):
            raise ConfigError(f"{where}: hold_connections_s must be a number of seconds from 0 to 3600, not {value!r}")
        values[key] = float(value) if key == "hold_connections_s" else value  # type: ignore[arg-type]
    return HostSettings(**values)  # type: ignore[arg-type]


def host_settings(host: str, path: Path | None = None) -> HostSettings:
    """Return the settings of `host`; a malformed or invalid file is a ConfigError naming the file and key."""
    path = path or settings_path()
    if not path.is_file():
        return HostSettings()
    if sys.version_info >= (3, 11):
        import tomllib
    else:  # pragma: no cover - Python 3.10
        import tomli as tomllib

    try:
        data = tomllib.loads(path.read_text())
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError(f"{path}: {exc}", "fix the file; docs/settings.md shows its format") from exc
    hosts = data.pop("hosts", {})
    if not isinstance(hosts, dict):
        raise ConfigError(f"{path}: 'hosts' must be a table of [hosts.NAME] sections")
    defaults = _validate(data, str(path), HostSettings())
    for name, table in hosts.items():
        if not isinstance(table, dict):
            raise ConfigError(f"{path}: hosts.{name} must be a table")
        if name == host:
            return _validate(table, f"{path} [hosts.{name}]", defaults)
        _validate(table, f"{path} [hosts.{name}]", defaults)
    return defaults
