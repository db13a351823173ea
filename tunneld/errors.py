"""The one exception tree: every failure tunneld reports is a TunneldError with a hint and an exit code."""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence

from tunneld.safetext import printable

EXIT_OK = 0
EXIT_RUNTIME = 1
EXIT_USAGE = 2
EXIT_NOT_RUNNING = 3
EXIT_UNAVAILABLE = 69  # sysexits EX_UNAVAILABLE: the server could not be reached at first try
EXIT_CONFIG = 78  # sysexits EX_CONFIG: retrying cannot help; service managers do not restart on it


class TunneldError(Exception):
    """Base of every error tunneld reports: a message, an optional hint, an exit code."""

    exit_code = EXIT_RUNTIME
    retryable = False

    def __init__(self, message: str, hint: str | None = None) -> None:
        # Messages quote servers, files and ssh's output: never let them carry terminal escapes.
        message = printable(message)
        super().__init__(message)
        self.message = message
        self.hint = printable(hint, keep_newlines=True) if hint is not None else None

    def to_dict(self) -> dict[str, object]:
        """Return the error as JSON-ready data (state files, the readiness handshake)."""
        return {
            "kind": type(self).__name__,
            "message": self.message,
            "hint": self.hint,
            "exit_code": self.exit_code,
            "retryable": self.retryable,
        }


class FatalError(TunneldError):
    """Something in the configuration, credentials or host keys is wrong; retrying cannot help."""

    exit_code = EXIT_CONFIG


class ConfigError(FatalError):
    """The ssh_config or tunneld's own settings cannot be used as they are."""


class CorruptFileError(ConfigError):
    """One of tunneld's own files (pid, state, manifest) cannot be trusted as it is."""

    def __init__(self, path: object, why: str, host: str | None = None) -> None:
        remedy = f"remove it, or run `tunneld stop {host}`" if host else "remove it"
        super().__init__(f"corrupt file {path}: {why}", f"{remedy}; tunneld writes a new one when it needs to")
        self.path = str(path)


class NoForwardsError(ConfigError):
    """The host is unknown to ssh_config or has no forwards to keep up."""


class AuthError(FatalError):
    """The server refused every credential offered.

    `locked`: key files that could log in but need a passphrase no agent supplies (`start` on a terminal offers
    `ssh-add`); `methods`: what the server said it still accepts (`password`, `keyboard-interactive`: a human
    can log in with `tunneld login`).
    """

    def __init__(
        self, message: str, hint: str | None = None, locked: tuple[str, ...] = (), methods: tuple[str, ...] = ()
    ) -> None:
        super().__init__(message, hint)
        self.locked = locked
        self.methods = methods or _methods_in(message)

    @property
    def interactive(self) -> bool:
        """The server would take a password or answers to questions (a one-time code, Duo)."""
        return any(method in ("password", "keyboard-interactive") for method in self.methods)

    def to_dict(self) -> dict[str, object]:
        """Return the error as JSON-ready data, with the keys and methods the CLI acts on."""
        return {**super().to_dict(), "locked": list(self.locked), "methods": list(self.methods)}

    @classmethod
    def refused(
        cls, where: str, ssh_command: str, detail: str, locked_key: str | None = None, missing: tuple[str, ...] = ()
    ) -> AuthError:
        """`where` (user@host:port) refused us; `locked_key` needed a passphrase ("" if unnamed); `missing`:
        configured IdentityFiles that do not exist; `ssh_command` tests the same config (`ssh -F FILE HOST`)."""
        if missing:
            detail += f"; IdentityFile {', '.join(missing)} does not exist"
            hint = f"point IdentityFile at your private key (or create it), then try `{ssh_command}` by hand"
            return cls(f"{where} refused authentication: {detail}", hint)
        locked = (locked_key,) if locked_key else ()
        if locked_key is not None:
            command = f"ssh-add {locked_key}".strip()
            hint = f"your key needs a passphrase and tunneld never prompts: load it with `{command}` first"
        else:
            hint = (
                "check that your public key is in ~/.ssh/authorized_keys on the server and that IdentityFile "
                f"points at it; a key with a passphrase must be loaded with `ssh-add`. Try `{ssh_command}` by hand"
            )
        error = cls(f"{where} refused authentication: {detail}", hint, locked)
        if error.interactive and locked_key is None:
            alias = ssh_command.rsplit(" ", 1)[-1]
            error.hint = (
                f"the server also takes a password or one-time code: log in with `tunneld login {alias}` in a "
                f"terminal; or load a key it accepts with `ssh-add`"
            )
        return error

    @classmethod
    def locked_keys(cls, where: str, ssh_command: str, keys: Sequence[str]) -> AuthError:
        """The key files that could log in need a passphrase, and no agent holds them (both engines' words)."""
        return cls.refused(where, ssh_command, f"{', '.join(keys)} needs a passphrase and no agent holds it", keys[0])

    @classmethod
    def too_many_keys(cls, where: str, ssh_command: str) -> AuthError:
        """The verified server ended the login because more keys were offered than it allows (MaxAuthTries)."""
        return cls(
            f"{where} refused authentication: Too many authentication failures (more keys were offered than the "
            "server's MaxAuthTries allows)",
            "offer only the right key: set `IdentitiesOnly yes` and `IdentityFile` for this host in your ssh_config, "
            f"then try `{ssh_command}` by hand",
        )


class NeedsAuthError(AuthError):
    """A host that logged in before is refused now: it waits for its credentials to change (state needs-auth)."""

    @classmethod
    def waiting(
        cls, alias: str, reason: str, interactive: bool = False, locked: tuple[str, ...] = (),
        keys: tuple[str, ...] = (), server_side: bool = False,
    ) -> NeedsAuthError:  # fmt: skip
        """`reason`: what the agent offers now (or that the interactive login connection ended); `locked`: key files
        that would do, once loaded with ssh-add; `keys`: the IdentityFiles the host names (for the hint);
        `server_side`: the key that logged in before came from a file and nothing changed here."""
        command = f"ssh-add {(locked or keys or ('',))[0]}".strip()
        if server_side and not interactive:
            hint = (
                "the server no longer accepts that key: check its ~/.ssh/authorized_keys (or its AuthorizedKeysFile), "
                f"then run `tunneld start {alias}`, which tries again at once (tunneld does not retry a refused login "
                "by itself unless the agent offers a new key)"
            )
            return cls(f"{alias} needs your key: {reason}", hint, locked)
        if interactive:
            hint = (
                f"run `tunneld login {alias}` in a terminal (or load a key the server accepts with `{command}`); "
                "the forwards come back once you are logged in"
            )
            return cls(f"{alias} needs you to log in again: {reason}", hint, locked, ("password",))
        hint = (
            f"load your key with `{command}` (or unlock the agent): tunneld tries again as soon as the agent offers "
            f"a key it did not, or at once with `tunneld start {alias}`"
        )
        return cls(f"{alias} needs your key: {reason}", hint, locked)


class HostKeyError(FatalError):
    """The server's host key is unknown or differs from the one in known_hosts."""

    @classmethod
    def changed(cls, hostname: str, ssh_command: str, remove_command: str, saved_in: str) -> HostKeyError:
        """The key differs from the saved one (`saved_in`: where, when known; `remove_command`: ssh-keygen -R ...)."""
        return cls(
            f"the host key of {hostname} has CHANGED since it was saved in known_hosts{saved_in}",
            f"if the server was reinstalled and you trust its new key, remove the old one with "
            f"`{remove_command}` and connect once with `{ssh_command}`; "
            "otherwise someone may be intercepting the connection",
        )

    @classmethod
    def revoked(cls, hostname: str, fingerprint: str, where: str) -> HostKeyError:
        """The key the server presented is marked @revoked (`where`: the file and line, when known)."""
        return cls(
            f"the host key {fingerprint} presented by {hostname} is marked as REVOKED{where and f' ({where})'}",
            "a revoked key may have been stolen: do not connect; ask the server's administrator for its new key",
        )

    @classmethod
    def unknown(cls, hostname: str, ssh_command: str) -> HostKeyError:
        """No key is known and StrictHostKeyChecking forbids learning one."""
        return cls(
            f"the host key of {hostname} is not in known_hosts and StrictHostKeyChecking forbids adding it",
            f"connect once with `{ssh_command}` to check and save the key, "
            "or set `StrictHostKeyChecking accept-new` for this host",
        )


class PortInUseError(FatalError):
    """A local forward cannot listen because another process holds the port or socket."""

    def __init__(self, message: str, hint: str | None = None, holder: str | None = None) -> None:
        super().__init__(message, hint)
        self.holder = holder


class ConnectError(TunneldError):
    """The server could not be reached or the link broke; retrying may help."""

    exit_code = EXIT_UNAVAILABLE
    retryable = True


class UnreachableError(ConnectError):
    """The first hop did not accept a TCP connection (refused, no route, timed out, name not resolved)."""


class HandshakeStalledError(ConnectError):
    """The server accepted TCP but the SSH handshake did not complete in time (frozen, overloaded, not sshd)."""


class RefusedByServerError(ConnectError):
    """TCP was accepted, then closed or reset before any SSH banner: the server's defences (OpenSSH's
    PerSourcePenalties, MaxStartups, a fail2ban-style drop) refuse new connections from this address for now."""

    @classmethod
    def before_banner(cls, where: str, how: str, said: str | None = None) -> RefusedByServerError:
        """`where` (host:port) accepted TCP and then `how` ("closed", "reset") it before any SSH banner; `said`: what
        the peer sent instead, already quoted as the peer's (OpenSSH 9.8+ says `Not allowed at this time`)."""
        what = (
            f"the peer sent {said}, not an SSH banner, and {how} the connection"
            if said
            else (f"{where} {how} the connection before its SSH banner")
        )
        error = cls(
            f"the server refuses new connections for now (rate limit?): {what}",
            "OpenSSH 9.8+ blocks an address for a while after connections that end before authentication "
            "(PerSourcePenalties), as do MaxStartups and fail2ban; tunneld waits at least 20 s between attempts",
        )
        error.peer_said = said is not None
        return error

    peer_said: bool = False  # sshd refuses with a line of text; a bare close or reset is also how a server goes down


class AlreadyRunningError(TunneldError):
    """A tunnel for this host is already running."""

    exit_code = EXIT_OK

    def __init__(self, host: str, pid: int | None, note: str = "") -> None:
        shown = f"pid {pid}" if pid else "starting"
        note = f"; {note}" if note else ""
        super().__init__(f"{host} is already running ({shown}){note}", f"stop it with: tunneld stop {host}")
        self.pid = pid


class NotRunningError(TunneldError):
    """No tunnel is running for this host."""

    exit_code = EXIT_NOT_RUNNING


class StartupError(TunneldError):
    """A detached tunnel did not report ready in time or died without saying why."""


class AutostartError(TunneldError):
    """Autostart could not be set up or removed on this platform."""


def report_error(error: TunneldError, echo: Callable[[str, bool], None]) -> int:
    """Tell the user about `error` (`Error: ...` and `  hint: ...` on stderr; `already running` on stdout)
    and return the exit code: the one place the CLI and the detached daemon turn errors into words."""
    if isinstance(error, AlreadyRunningError):
        echo(error.message, False)
        return error.exit_code
    echo(f"Error: {error.message}", True)
    if error.hint:
        echo(f"  hint: {error.hint}", True)
    return error.exit_code


_METHODS_RE = re.compile(r"Permission denied \(([a-z0-9@.,-]+)\)")


def _methods_in(message: str) -> tuple[str, ...]:
    """Read the methods ssh says the server still accepts (`Permission denied (publickey,password).`)."""
    match = _METHODS_RE.search(message)
    return tuple(match[1].split(",")) if match else ()


def error_from_dict(data: dict[str, object]) -> TunneldError:
    """Rebuild a TunneldError from `TunneldError.to_dict()` output (the other side of a pipe)."""
    message = str(data.get("message", "unknown error"))
    hint = data.get("hint")
    hint_text = str(hint) if hint else None
    kind = str(data.get("kind", ""))
    if kind == "PortInUseError":
        return PortInUseError(message, hint_text)
    cls = next((c for c in _error_classes(TunneldError) if c.__name__ == kind), TunneldError)
    if cls in (AlreadyRunningError, PortInUseError, CorruptFileError):  # their constructors take other arguments
        cls = ConfigError if cls is CorruptFileError else TunneldError
    if issubclass(cls, AuthError):
        locked, methods = data.get("locked"), data.get("methods")
        return cls(message, hint_text, _strings(locked), _strings(methods))
    return cls(message, hint_text)


def _strings(value: object) -> tuple[str, ...]:
    return tuple(str(item) for item in value) if isinstance(value, list) else ()


def _error_classes(base: type[TunneldError]) -> list[type[TunneldError]]:
    """Every class of the tree (each kind keeps its exit code and retryability across the pipe)."""
    found = [base]
    for sub in base.__subclasses__():
        found += _error_classes(sub)
    return found
