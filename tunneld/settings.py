"""tunneld's own per-host settings: a TOML file under the user's config directory, validated on read."""

from __future__ import annotations

import sys
from dataclasses import dataclass, fields
from pathlib import Path

from tunneld.errors import ConfigError
from tunneld.paths import config_dir

ENGINES = ("auto", "openssh", "paramiko")
SETTINGS_FILE = "tunneld.toml"
MAX_SETTINGS_BYTES = 256 * 1024


@dataclass(frozen=True)
class HostSettings:
    """Settings for one host: the file's top level gives defaults, `[hosts.NAME]` overrides them."""

    engine: str = "auto"
    hold_connections_s: float = 10.0
    health_interval_s: float = 30.0
    # (forward's local port or socket path, "tcp" or an HTTP path such as "/health")
    health: tuple[tuple[str, str], ...] = ()

    def health_check(self, listen: str) -> str | None:
        """Return the periodic check configured for the forward listening on `listen` (a port or a path)."""
        return next((check for key, check in self.health if key == listen), None)


def settings_path() -> Path:
    """Return the settings file's path (it need not exist)."""
    return config_dir() / SETTINGS_FILE


# Numeric settings: (lowest, highest) in seconds.
_RANGES_S = {"hold_connections_s": (0.0, 3600.0), "health_interval_s": (1.0, 3600.0)}


def _validate(table: dict[str, object], where: str, base: HostSettings) -> HostSettings:
    known = {f.name for f in fields(HostSettings)}
    values: dict[str, object] = {f.name: getattr(base, f.name) for f in fields(HostSettings)}
    for key, value in table.items():
        if key not in known:
            raise ConfigError(f"{where}: unknown setting {_toml(key)}", f"known settings: {', '.join(sorted(known))}")
        if key == "engine" and value not in ENGINES:
            raise ConfigError(f"{where}: engine must be one of {', '.join(ENGINES)}, not {_toml(value)}")
        if key in _RANGES_S:
            low, high = _RANGES_S[key]
            if not isinstance(value, (int, float)) or isinstance(value, bool) or not low <= value <= high:
                raise ConfigError(
                    f"{where}: {key} must be a number of seconds from {low:g} to {high:g}, not {_toml(value)}"
                )
            values[key] = float(value)
        elif key == "health":
            values[key] = _validate_health(value, where)
        else:
            values[key] = value
    return HostSettings(**values)  # type: ignore[arg-type]


def _validate_health(table: object, where: str) -> tuple[tuple[str, str], ...]:
    if not isinstance(table, dict):
        raise ConfigError(f'{where}: health must be a table such as  [hosts.NAME.health]  "5000" = "/health"')
    checks = []
    for key, check in table.items():
        if not (key.isdigit() and 0 < int(key) < 65536) and not key.startswith("/"):
            raise ConfigError(
                f'{where}: health key {_toml(key)} must be a forward\'s local port ("5000") or socket path'
            )
        if not isinstance(check, str) or not (check == "tcp" or (check.startswith("/") and check.isprintable())):
            raise ConfigError(
                f'{where}: health.{key} must be "tcp" or an HTTP path such as "/health", not {_toml(check)}'
            )
        checks.append((key, check))
    return tuple(checks)


def _toml(value: object) -> str:
    """Show a value as it would be written in TOML (true, "10"), not as a Python repr."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    return str(value)


def host_settings(host: str, path: Path | None = None) -> HostSettings:
    """Return the settings of `host`; a malformed or invalid file is a ConfigError naming the file and key."""
    path = path or settings_path()
    if not path.is_file():
        return HostSettings()
    if sys.version_info >= (3, 11):
        import tomllib
    else:  # pragma: no cover - Python 3.10
        import tomli as tomllib

    hint = "fix the file; its format is in docs/engines.md, section tunneld.toml"
    try:
        with path.open("rb") as handle:
            raw = handle.read(MAX_SETTINGS_BYTES + 1)
        if len(raw) > MAX_SETTINGS_BYTES:
            raise ConfigError(f"{path}: larger than {MAX_SETTINGS_BYTES} bytes; tunneld.toml is a short file", hint)
        data = tomllib.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not UTF-8 text", hint) from exc
    except (OSError, tomllib.TOMLDecodeError, RecursionError) as exc:
        raise ConfigError(f"{path}: {exc}", hint) from exc
    hosts = data.pop("hosts", {})
    if not isinstance(hosts, dict):
        raise ConfigError(f"{path}: 'hosts' must be a table of [hosts.NAME] sections")
    defaults = _validate(data, str(path), HostSettings())
    for name, table in hosts.items():
        if not isinstance(table, dict):
            raise ConfigError(f"{path}: hosts.{_toml(name)} must be a table")
        if name == host:
            return _validate(table, f"{path} [hosts.{name}]", defaults)
        _validate(table, f"{path} [hosts.{name}]", defaults)
    return defaults
