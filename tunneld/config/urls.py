"""How a host's forwards are reached from this machine: their addresses and URLs (`url`), the variables of
tunneld.toml's `[hosts.NAME.env]` rendered from them (`env`), and a command run with those variables (`exec`)."""

from __future__ import annotations

import ipaddress
import os
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, NoReturn

from tunneld.errors import ConfigError, TunneldError
from tunneld.safetext import printable

if TYPE_CHECKING:
    from tunneld.config.listen import ListenPlan

EXIT_CANNOT_EXECUTE = 126  # as a shell reports a command it found but could not run
EXIT_COMMAND_NOT_FOUND = 127
_SCHEME_RE = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*")
# `{{`, `}}`, `{local}`, `{local:PORT}`, or anything else between braces (reported as unknown); a lone brace.
_PLACEHOLDER_RE = re.compile(r"\{\{|\}\}|\{([^{}]*)\}|[{}]")
_WILDCARDS = {"0.0.0.0": "127.0.0.1", "::": "::1"}  # a forward on every interface is reached on loopback


@dataclass(frozen=True)
class ForwardAddress:
    """Where one LocalForward (or DynamicForward) listens on this machine, and where it leads."""

    listen: tuple[str, ...]  # `127.0.0.1:5000`, `[::1]:5000`, or a unix socket path
    target: str  # `localhost:5000` as the server resolves it, or `SOCKS`
    local_port: int | None = None
    remote_port: int | None = None
    socks: bool = False

    @property
    def address(self) -> str:
        """Return the address a client here connects to: IPv4 loopback preferred (`127.0.0.1:5000`), a wildcard
        listener reached on loopback, or the socket path."""
        tcp = [_split(a) for a in self.listen if not a.startswith("/")]
        if not tcp:
            return self.listen[0] if self.listen else ""
        hosts = [_WILDCARDS.get(ip, ip) for ip, _ in tcp]
        ranked = sorted(hosts, key=lambda ip: (ip != "127.0.0.1", not ip.startswith("127."), ip != "::1"))
        best = ranked[0]
        return f"[{best}]:{tcp[0][1]}" if ":" in best else f"{best}:{tcp[0][1]}"

    def url(self, scheme: str = "http") -> str:
        """Return `scheme://address` (`http://127.0.0.1:5000`); a forward that listens on a unix socket has none."""
        if not is_scheme(scheme):
            raise TunneldError(f"{scheme!r} is not a URL scheme", "use a scheme such as http, https or socks5h")
        if self.local_port is None:
            raise ConfigError(f"the forward {self} listens on a unix socket: it has no URL", "name another forward")
        return f"{scheme}://{self.address}"

    def __str__(self) -> str:
        return f"{self.address} -> {self.target}"


def is_scheme(text: str) -> bool:
    """Return True when `text` can be a URL's scheme (RFC 3986: a letter, then letters, digits, + - .)."""
    return bool(_SCHEME_RE.fullmatch(text))


def _split(address: str) -> tuple[str, int]:
    host, _, port = address.rpartition(":")
    return host.strip("[]"), int(port)


def forwards_from_plans(plans: Iterable[ListenPlan]) -> tuple[ForwardAddress, ...]:
    """Return where each planned local forward listens (what `start` would bind), from the ssh_config."""
    from tunneld.config.spec import DYNAMIC

    found = []
    for plan in plans:
        target = plan.forward.target
        found.append(
            ForwardAddress(
                plan.addresses,
                str(target) if target else "SOCKS",
                plan.forward.listen.port,
                target.port if target else None,
                socks=plan.forward.kind == DYNAMIC,
            )
        )
    return tuple(found)


def forwards_from_state(forwards: Iterable[Mapping[str, object]]) -> tuple[ForwardAddress, ...]:
    """Return where a running tunnel's local forwards listen, from its state file's `forwards` (remote forwards,
    and entries that are not what tunneld writes, are left out: the file may have been edited)."""
    found = []
    for entry in forwards:
        text, listen, target = entry.get("forward"), entry.get("listen"), entry.get("target")
        if not (isinstance(text, str) and isinstance(listen, list) and isinstance(target, str)) or not listen:
            continue
        if text.startswith("remote ") or not all(isinstance(a, str) and _is_local_address(a) for a in listen):
            continue
        socks = text.endswith("(SOCKS)")
        local_port = None if listen[0].startswith("/") else _split(listen[0])[1]
        _, _, remote = target.rpartition(":")
        remote_port = int(remote) if remote.isdigit() and not socks else None
        found.append(
            ForwardAddress(tuple(listen), "SOCKS" if socks else printable(target), local_port, remote_port, socks)
        )
    return tuple(found)


def _is_local_address(text: str) -> bool:
    if text.startswith("/"):
        return text.isprintable()
    host, _, port = text.rpartition(":")
    if not (port.isdigit() and 0 < int(port) < 65536):
        return False
    try:
        ipaddress.ip_address(host[1:-1] if host.startswith("[") and host.endswith("]") else host)
    except ValueError:
        return False
    return True


def host_forwards(host: str, ssh_config: str | None) -> tuple[ForwardAddress, ...]:
    """Return the host's local forwards: where its running tunnel listens, else where `start` would listen
    (from the ssh_config given, or the one the host was last started with)."""
    from tunneld.state.paths import validate_host
    from tunneld.state.status import collect, ssh_config_for

    report = collect(validate_host(host))
    found = forwards_from_state(report.forwards) if report.running else ()
    if found:
        return found
    from tunneld.config.listen import plan_spec
    from tunneld.config.resolve import resolve_host

    return forwards_from_plans(plan_spec(resolve_host(host, ssh_config_for(host, ssh_config))))


class NoSuchForwardError(ConfigError):
    """A port names none of the host's forwards (`url HOST PORT` makes it a usage error, exit 2)."""


def pick_forward(host: str, forwards: Sequence[ForwardAddress], port: int | None = None) -> ForwardAddress:
    """Return the first LocalForward, or the forward whose local port (else remote port) is `port`."""
    if port is None:
        found = next((f for f in forwards if not f.socks and f.local_port is not None), None)
        if found is None:
            raise ConfigError(f"{host} has no LocalForward that listens on a TCP port", _forwards_hint(host, forwards))
        return found
    found = next((f for f in forwards if f.local_port == port), None) or next(
        (f for f in forwards if f.remote_port == port), None
    )
    if found is None:
        raise NoSuchForwardError(
            f"no forward of {host} has the local or remote port {port}", _forwards_hint(host, forwards)
        )
    return found


def _forwards_hint(host: str, forwards: Sequence[ForwardAddress]) -> str:
    if not forwards:
        return f"{host} has no local forwards: add one under 'Host {host}', e.g.  LocalForward 5000 localhost:5000"
    return f"the forwards of {host}: {', '.join(map(str, forwards))}"


def render_env(host: str, variables: Sequence[tuple[str, str]], forwards: Sequence[ForwardAddress]) -> dict[str, str]:
    """Return `[hosts.HOST.env]` with `{local}` (the first LocalForward's address, `127.0.0.1:5000`) and
    `{local:PORT}` (the forward whose local or remote port is PORT) filled in; `{{` and `}}` are braces.

    An unknown placeholder, or a port that names no forward, is a ConfigError naming the key and the forwards.
    """
    from tunneld.state.paths import settings_path

    return {name: _render(template, forwards, host, f"{settings_path()} [hosts.{host}.env] {name}")
            for name, template in variables}  # fmt: skip


def _render(template: str, forwards: Sequence[ForwardAddress], host: str, where: str) -> str:
    def fill(match: re.Match[str]) -> str:
        whole, inner = match[0], match[1]
        if whole in ("{{", "}}"):
            return whole[0]
        if inner is None:
            raise ConfigError(f"{where}: a lone {whole!r} in {template!r}", "write {{ or }} for a brace itself")
        name, colon, port = inner.partition(":")
        if name != "local" or (colon and not port.isdigit()):
            raise ConfigError(
                f"{where}: unknown placeholder {whole} (known: {{local}}, {{local:PORT}})",
                _forwards_hint(host, forwards),
            )
        try:
            return pick_forward(host, forwards, int(port) if colon else None).address
        except ConfigError as error:
            raise ConfigError(f"{where}: {whole}: {error.message}", error.hint) from None

    return _PLACEHOLDER_RE.sub(fill, template)


def host_env(host: str, forwards: Sequence[ForwardAddress]) -> dict[str, str]:
    """Return the host's `[hosts.HOST.env]` of tunneld.toml rendered for `forwards` ({} when it has none)."""
    from tunneld.config.settings import host_settings

    variables = host_settings(host).env
    return render_env(host, variables, forwards) if variables else {}


def export_lines(env: Mapping[str, str]) -> list[str]:
    """Return `export NAME='value'` lines for a POSIX shell's `eval`."""
    return [f"export {name}={_single_quoted(value)}" for name, value in env.items()]


def _single_quoted(value: str) -> str:
    """Quote for a POSIX shell: inside '...' nothing is special; a ' itself is written '\\''."""
    return "'" + value.replace("'", "'\\''") + "'"


class CommandNotFoundError(TunneldError):
    """The command `exec` was asked to run does not exist (a shell exits 127 for it)."""

    exit_code = EXIT_COMMAND_NOT_FOUND


class CommandNotExecutableError(TunneldError):
    """The command `exec` was asked to run exists but cannot be run (a shell exits 126 for it)."""

    exit_code = EXIT_CANNOT_EXECUTE


def exec_command(argv: Sequence[str], env: Mapping[str, str]) -> NoReturn:
    """Replace this process with `argv` (searched on PATH), its environment plus `env`: the command's signals and
    exit code are its own."""
    try:
        os.execvpe(argv[0], list(argv), {**os.environ, **env})  # noqa: S606 - the user's command, as given
    except FileNotFoundError:
        raise CommandNotFoundError(f"{argv[0]}: command not found", "check its name, or give its path") from None
    except OSError as exc:
        raise CommandNotExecutableError(f"{argv[0]}: cannot run it: {exc.strerror}") from None
