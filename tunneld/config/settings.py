"""tunneld's own per-host settings: a TOML file under the user's config directory, validated on read."""

from __future__ import annotations

import re
import sys
from collections.abc import Iterable
from dataclasses import dataclass, fields
from pathlib import Path

from tunneld.errors import ConfigError
from tunneld.state.paths import settings_path

ENGINES = ("auto", "openssh", "paramiko")
MAX_SETTINGS_BYTES = 256 * 1024


@dataclass(frozen=True)
class HostSettings:
    """Settings for one host: the file's top level gives defaults, `[hosts.NAME]` overrides them."""

    engine: str = "auto"
    hold_connections_s: float = 10.0
    health_interval_s: float = 30.0
    # (forward's local port or socket path, "tcp" or an HTTP path such as "/health")
    health: tuple[tuple[str, str], ...] = ()
    # Desktop notifications on loss and restore; None: on for supervisors that keep trying from the start
    # (`run`, `start --keep-trying`: what autostart runs), off for a plain `start`.
    notify: bool | None = None
    notify_after_s: float = 10.0
    # Listen at start, connect on the first client, disconnect after idle_timeout_s without connections.
    on_demand: bool = False
    idle_timeout_s: float = 600.0
    # [hosts.NAME.env]: (variable name, template such as "http://{local}"), rendered by tunneld.config.urls.
    env: tuple[tuple[str, str], ...] = ()

    def health_check(self, listen: str) -> str | None:
        """Return the periodic check configured for the forward listening on `listen` (a port or a path)."""
        return next((check for key, check in self.health if key == listen), None)


# Numeric settings: (lowest, highest) in seconds.
_RANGES_S = {
    "hold_connections_s": (0.0, 3600.0),
    "health_interval_s": (1.0, 3600.0),
    "notify_after_s": (0.0, 86400.0),
    "idle_timeout_s": (1.0, 86400.0),
}
_BOOLEANS = ("notify", "on_demand")
GROUP_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]*")
ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


def known_settings() -> str:
    """Say what tunneld.toml holds, every setting with the values it takes: the hint of a bad file, which must help
    offline (a pipx install has no docs/ to point at)."""
    takes = []
    for setting in fields(HostSettings):
        key = setting.name
        if key == "engine":
            takes.append(f"engine = {' | '.join(_toml(e) for e in ENGINES)}")
        elif key in _RANGES_S:
            low, high = _RANGES_S[key]
            takes.append(f"{key} = {low:g}..{high:g} (seconds)")
        elif key in _BOOLEANS:
            takes.append(f"{key} = true | false")
    return (
        "tunneld.toml: defaults at the top, [hosts.NAME] tables override them; settings: "
        + "; ".join(takes)
        + '; tables: [hosts.NAME.health] "5000" = "/health" or "tcp", [hosts.NAME.env] NAME = "http://{local}", '
        '[groups] ml = ["host1", "host2"]'
    )


def _validate(table: dict[str, object], where: str, base: HostSettings) -> HostSettings:
    known = {f.name for f in fields(HostSettings)}
    values: dict[str, object] = {f.name: getattr(base, f.name) for f in fields(HostSettings)}
    for key, value in table.items():
        if key not in known:
            raise ConfigError(f"{where}: unknown setting {_toml(key)}", known_settings())
        if key == "engine" and value not in ENGINES:
            raise ConfigError(f"{where}: engine must be one of {', '.join(ENGINES)}, not {_toml(value)}")
        if key in _RANGES_S:
            low, high = _RANGES_S[key]
            if not isinstance(value, (int, float)) or isinstance(value, bool) or not low <= value <= high:
                raise ConfigError(
                    f"{where}: {key} must be a number of seconds from {low:g} to {high:g}, not {_toml(value)}"
                )
            values[key] = float(value)
        elif key in _BOOLEANS:
            if not isinstance(value, bool):
                raise ConfigError(f"{where}: {key} must be true or false, not {_toml(value)}")
            values[key] = value
        elif key == "health":
            values[key] = _validate_health(value, where)
        elif key == "env":
            values[key] = _validate_env(value, where)
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


def _validate_env(table: object, where: str) -> tuple[tuple[str, str], ...]:
    if not isinstance(table, dict):
        raise ConfigError(
            f'{where}: env must be a table such as  [hosts.NAME.env]  MLFLOW_TRACKING_URI = "http://{{local}}"'
        )
    variables = []
    for name, value in table.items():
        if not ENV_NAME.fullmatch(name):
            raise ConfigError(
                f"{where}: env name {_toml(name)} is not an environment variable name",
                "use letters, digits and _, not starting with a digit, e.g. MLFLOW_TRACKING_URI",
            )
        if not isinstance(value, str) or "\x00" in value:
            raise ConfigError(f'{where}: env.{name} must be a string such as "http://{{local}}", not {_toml(value)}')
        variables.append((name, value))
    return tuple(variables)


def _toml(value: object) -> str:
    """Show a value as it would be written in TOML (true, "10"), not as a Python repr."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    return str(value)


def _load(path: Path) -> dict[str, object]:
    """Return the settings file's parsed TOML ({} when there is none); a bad file is a ConfigError naming it."""
    if not path.is_file():
        return {}
    if sys.version_info >= (3, 11):
        import tomllib
    else:  # pragma: no cover - Python 3.10
        import tomli as tomllib

    hint = f"fix the file; {known_settings()}"
    try:
        with path.open("rb") as handle:
            raw = handle.read(MAX_SETTINGS_BYTES + 1)
        if len(raw) > MAX_SETTINGS_BYTES:
            raise ConfigError(f"{path}: larger than {MAX_SETTINGS_BYTES} bytes; tunneld.toml is a short file", hint)
        data: dict[str, object] = tomllib.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not UTF-8 text", hint) from exc
    except (OSError, tomllib.TOMLDecodeError, RecursionError) as exc:
        raise ConfigError(f"{path}: {exc}", hint) from exc
    return data


def host_settings(host: str, path: Path | None = None) -> HostSettings:
    """Return the settings of `host`; a malformed or invalid file is a ConfigError naming the file and key."""
    path = path or settings_path()
    data = _load(path)
    data.pop("groups", None)  # validated by groups()
    hosts = data.pop("hosts", {})
    if not isinstance(hosts, dict):
        raise ConfigError(f"{path}: 'hosts' must be a table of [hosts.NAME] sections")
    if "env" in data:
        raise ConfigError(f"{path}: env is set per host, in a [hosts.NAME.env] table, not at the top level")
    defaults = _validate(data, str(path), HostSettings())
    found = defaults
    for name, table in hosts.items():
        if not isinstance(table, dict):
            raise ConfigError(f"{path}: hosts.{_toml(name)} must be a table")
        checked = _validate(table, f"{path} [hosts.{name}]", defaults)
        if name == host:
            found = checked
    return found


def groups(path: Path | None = None) -> dict[str, tuple[str, ...]]:
    """Return the `[groups]` of tunneld.toml: name -> member hosts, in the file's order."""
    from tunneld.state.paths import is_valid_host

    path = path or settings_path()
    table = _load(path).get("groups", {})
    if not isinstance(table, dict):
        raise ConfigError(f'{path}: groups must be a table such as  [groups]  ml = ["mlflowserver", "jupyter"]')
    found: dict[str, tuple[str, ...]] = {}
    for name, members in table.items():
        if not GROUP_NAME.fullmatch(name):
            raise ConfigError(f"{path}: group name {_toml(name)} must be letters, digits and . _ -")
        if not isinstance(members, list) or not members or not all(isinstance(m, str) for m in members):
            raise ConfigError(f"{path}: groups.{name} must be a non-empty list of host names, not {_toml(members)}")
        for member in members:
            if not is_valid_host(member):
                raise ConfigError(f"{path}: groups.{name} names {_toml(member)}, which is not a usable host name")
        found[name] = tuple(dict.fromkeys(members))
    return found


def expand_groups(names: Iterable[str], path: Path | None = None) -> list[str]:
    """Replace every `@group` among `names` by its members (first mention wins); other names stay as given."""
    names = list(names)
    if not any(name.startswith("@") for name in names):
        return list(dict.fromkeys(names))
    path = path or settings_path()
    defined = groups(path)
    hosts: list[str] = []
    for name in names:
        if not name.startswith("@"):
            hosts.append(name)
            continue
        members = defined.get(name[1:])
        if members is None:
            known = ", ".join(f"@{g}" for g in defined) or "none"
            raise ConfigError(
                f"no group {_toml(name)} in {path} (groups there: {known})",
                f'define it there:  [groups]  {name[1:] or "ml"} = ["host1", "host2"]',
            )
        hosts.extend(members)
    return list(dict.fromkeys(hosts))
