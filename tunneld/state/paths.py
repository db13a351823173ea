"""Every file location tunneld uses, in one place; TUNNELD_HOME overrides them all."""

from __future__ import annotations

import errno
import os
import pwd
import re
import stat
from dataclasses import dataclass
from pathlib import Path

from tunneld.errors import ConfigError

APP_NAME = "tunneld"
SETTINGS_FILE = "tunneld.toml"
CONTROL_PATH_MAX = 86  # sun_path holds 108 bytes; ssh -M first binds PATH.<16 random characters>
HOST_NAME_MAX = 128
MAX_SYMLINKS = 40  # as Linux follows at most 40 in one path (ELOOP)
# Host names become file names: letters, digits and . _ - @ + only, never a leading dot or dash.
_HOST_NAME_RE = re.compile(r"[A-Za-z0-9_@+][A-Za-z0-9._@+-]*")


def validate_host(host: str) -> str:
    """Return `host` if it is safe to use in a file name; raise ConfigError otherwise."""
    if not host:
        raise ConfigError("the host name is empty", "name a Host from your ssh_config, e.g. tunneld start mlflowserver")
    if len(host) > HOST_NAME_MAX:
        raise ConfigError(
            f"the host name is {len(host)} characters long; tunneld accepts at most {HOST_NAME_MAX}",
            "use a shorter Host alias in your ssh_config",
        )
    if not _HOST_NAME_RE.fullmatch(host) or ".." in host:
        raise ConfigError(
            f"the host name {host!r} contains characters tunneld does not use in file names",
            "use a Host alias made of letters, digits and . _ - @ + (no '/', no '..', no leading '-' or '.')",
        )
    return host


def find_program(name: str) -> str | None:
    """Return the path of the executable `name` on PATH, or None (shutil.which, without loading shutil)."""
    for directory in os.environ.get("PATH", os.defpath).split(os.pathsep):
        candidate = os.path.join(directory, name)
        if os.path.isfile(candidate) and os.access(candidate, os.X_OK):
            return candidate
    return None


def home() -> Path | None:
    """Return TUNNELD_HOME when set (tests and demos use it), else None."""
    value = os.environ.get("TUNNELD_HOME")
    return Path(value) if value else None


def check_home() -> None:
    """Refuse an unusable TUNNELD_HOME (a file, another user's or a read-only directory, or one another user
    can redirect) before any verb runs."""
    override = home()
    if override is None:
        return
    redirectable = _redirectable(override)
    if redirectable is not None:
        raise _unusable(override, f"(TUNNELD_HOME) {redirectable}")
    if not os.path.lexists(override):
        return
    if not override.is_dir():
        raise _unusable(override, "(TUNNELD_HOME) is not a directory")
    info = override.stat()
    if info.st_uid != os.getuid():
        raise _unusable(override, f"(TUNNELD_HOME) belongs to uid {info.st_uid}, not to you (uid {os.getuid()})")
    if not os.access(override, os.W_OK | os.X_OK):
        raise _unusable(override, "(TUNNELD_HOME) is not writable")


def _redirectable(path: Path) -> str | None:
    """Say how another user could change where `path` leads (None: only you or root can).

    `path` is followed as the kernel follows it. Every symbolic link on the way must be yours or
    root's (its owner can point it elsewhere: in a sticky directory such as /tmp only the owner can
    replace it), and every directory a name is looked up in must be yours or root's and not
    writable by every user without the sticky bit (whoever can write there can move the entry and
    put another in its place). A link of yours to a directory of yours is fine. What does not exist
    yet is created by tunneld, as you.
    """
    me = os.getuid()
    trusted = (0, me)
    absolute = path if path.is_absolute() else Path(os.getcwd(), path)
    todo = list(reversed(absolute.parts[1:]))  # a stack: the next name on top
    current = "/"
    links = 0
    while todo:
        name = todo.pop()
        if name in ("", "."):
            continue
        if name == "..":
            current = os.path.dirname(current)
            continue
        parent = os.lstat(current)
        if parent.st_uid not in trusted:
            return f"lies in {current}, which belongs to uid {parent.st_uid}: that user could move it"
        if parent.st_mode & stat.S_IWOTH and not parent.st_mode & stat.S_ISVTX:
            return f"lies in {current}, which every user may write to (no sticky bit): anyone could move it"
        candidate = os.path.join(current, name)
        try:
            info = os.lstat(candidate)
        except OSError:
            return None  # missing (tunneld creates it, as you) or unreadable (the checks that follow say so)
        if not stat.S_ISLNK(info.st_mode):
            current = candidate
            continue
        if info.st_uid not in trusted:
            return (
                f"goes through the symbolic link {candidate}, which belongs to uid {info.st_uid}, not to you "
                f"(uid {me}): that user could point it elsewhere"
            )
        links += 1
        if links > MAX_SYMLINKS:
            return f"goes through more than {MAX_SYMLINKS} symbolic links"
        target = Path(os.readlink(candidate))
        if target.is_absolute():
            current = "/"
        todo.extend(reversed(target.parts[1:] if target.is_absolute() else target.parts))
    return None


# Set by a detached supervisor from its parent's answer, so that it need not load platformdirs (~1.1 MiB).
_pinned: dict[str, Path] = {}


def pin_dirs(state: Path, config: Path) -> None:
    """Use these directories from now on (what `tunneld start` resolved for the supervisor it detaches)."""
    _pinned.update(state=state, config=config)


def state_dir() -> Path:
    """Return the directory of pid, state and log files (not created here)."""
    override = home()
    if override is not None:
        return override / "state"
    if "state" in _pinned:
        return _pinned["state"]
    import platformdirs

    return Path(platformdirs.user_state_dir(APP_NAME))


def config_dir() -> Path:
    """Return the directory of tunneld's own settings."""
    override = home()
    if override is not None:
        return override / "config"
    if "config" in _pinned:
        return _pinned["config"]
    import platformdirs

    return Path(platformdirs.user_config_dir(APP_NAME))


def settings_path() -> Path:
    """Return where tunneld.toml, tunneld's own settings file, lives (it need not exist)."""
    return config_dir() / SETTINGS_FILE


def local_home() -> str:
    """Return the home directory ssh uses for `~` and `%d`: the passwd entry's, not $HOME."""
    try:
        return pwd.getpwuid(os.getuid()).pw_dir
    except KeyError:
        return os.path.expanduser("~")


def ensure_private_dir(path: Path) -> Path:
    """Create `path` (and parents) for tunneld's files; it must be a directory of this user, never a link.

    A looser mode is tightened to 0700; a link, a file, or another user's directory is refused, so that
    nobody else can read the tunnels' state or plant files (links) tunneld would then write through. Under
    a TUNNELD_HOME that another user could redirect, nothing is created.
    """
    override = home()
    if override is not None and path.is_relative_to(override) and (problem := _redirectable(path)):
        raise _unusable(path, problem)  # also where no verb ran check_home first (what autostart runs)
    try:
        path.mkdir(parents=True, exist_ok=True, mode=0o700)
    except FileExistsError as exc:
        raise _unusable(path, "exists and is not a directory") from exc
    except OSError as exc:
        raise _unusable(path, f"cannot be created: {exc.strerror}") from exc
    info = os.lstat(path)
    if stat.S_ISLNK(info.st_mode):
        raise _unusable(path, "is a symbolic link; tunneld keeps its files only in a real directory")
    if not stat.S_ISDIR(info.st_mode):
        raise _unusable(path, "exists and is not a directory")
    if info.st_uid != os.getuid():
        raise _unusable(path, f"belongs to uid {info.st_uid}, not to you (uid {os.getuid()})")
    if info.st_mode & 0o077:
        os.chmod(path, 0o700, follow_symlinks=False)
    if not os.access(path, os.W_OK | os.X_OK):
        raise _unusable(path, "is not writable")
    return path


def _unusable(path: Path, why: str) -> ConfigError:
    return ConfigError(
        f"tunneld's directory {path} {why}",
        "fix or remove it, or point TUNNELD_HOME at a directory of your own",
    )


def open_private(path: Path, flags: int) -> int:
    """Open one of tunneld's own files without following a link there; a new file is 0600, an old one made so.

    Refuses a link, a non-regular file, or a file of another user, with a ConfigError naming it.
    """
    try:
        fd = os.open(path, flags | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise ConfigError(
                f"{path} is a symbolic link: tunneld never follows links among its own files",
                f"remove the link (rm {path}) and try again",
            ) from exc
        raise ConfigError(f"cannot open {path}: {exc.strerror}") from exc
    info = os.fstat(fd)
    if not stat.S_ISREG(info.st_mode) or info.st_uid != os.getuid():
        os.close(fd)
        raise ConfigError(f"{path} is not a regular file of yours", f"remove it (rm {path}) and try again")
    if info.st_mode & 0o077:
        os.fchmod(fd, 0o600)
    return fd


@dataclass(frozen=True)
class HostFiles:
    """The files tunneld keeps for one host."""

    host: str
    directory: Path

    @classmethod
    def of(cls, host: str) -> HostFiles:
        """Return the files of a validated `host` under the state directory."""
        return cls(validate_host(host), state_dir())

    @property
    def pid(self) -> Path:
        return self.directory / f"{self.host}.pid"

    @property
    def lock(self) -> Path:
        return self.directory / f"{self.host}.lock"

    @property
    def stopping(self) -> Path:
        """The lock a `tunneld stop` holds while it stops the host (no host's file can have this name)."""
        return self.directory / f"{self.host}.stopping"

    @property
    def state(self) -> Path:
        return self.directory / f"{self.host}.state.json"

    @property
    def log(self) -> Path:
        return self.directory / f"{self.host}.log"

    @property
    def agent(self) -> Path:
        """The agent socket `tunneld start` handed to a host that waits for credentials (the user's shell has a new
        SSH_AUTH_SOCK since the tunnel started); no host's file can have this name."""
        return self.directory / f"{self.host}.agent"

    @property
    def master_log(self) -> Path:
        """What the ssh of `tunneld login`'s master connection writes (`ssh -E`); no host's file can have this name."""
        return self.directory / f"{self.host}.master-log"

    @property
    def control(self) -> Path:
        """The private control socket of `tunneld login`'s master connection (`ssh -M -S`).

        A unix socket path has room for about 100 bytes: a longer one moves to a private directory of this user,
        named by a digest of where it would have been, in the same place for every process of the user whatever
        its environment: /run/user/UID/tunneld where the user has that runtime directory, else /tmp/tunneld-UID.
        The directory must be the user's own, 0700, not a link (credentials.control_socket_alive checks).
        """
        path = self.directory / f"{self.host}.master"
        if len(os.fsencode(path)) <= CONTROL_PATH_MAX:
            return path
        import hashlib

        digest = hashlib.sha256(os.fsencode(path)).hexdigest()[:20]
        runtime = Path(f"/run/user/{os.getuid()}")
        base = runtime / "tunneld" if runtime.is_dir() else Path(f"/tmp/tunneld-{os.getuid()}")  # noqa: S108
        return base / f"{digest}.master"


def hosts_with_files() -> tuple[list[str], list[str]]:
    """Return (hosts that have a pid or state file, sorted; stray file names tunneld would never create)."""
    directory = state_dir()
    if not directory.is_dir():
        return [], []
    hosts: set[str] = set()
    stray: set[str] = set()
    for entry in directory.iterdir():
        for suffix in (".pid", ".state.json"):
            if entry.name.endswith(suffix):
                name = entry.name[: -len(suffix)]
                if is_valid_host(name):
                    hosts.add(name)
                else:
                    stray.add(entry.name)
    return sorted(hosts), sorted(stray)


def hosts_with_locks() -> list[str]:
    """Return the hosts that have a lock file, sorted (a first start holds it before any pid or state file exists)."""
    directory = state_dir()
    if not directory.is_dir():
        return []
    names = (entry.name.removesuffix(".lock") for entry in directory.iterdir() if entry.name.endswith(".lock"))
    return sorted(name for name in names if is_valid_host(name))


def known_hosts_with_files() -> list[str]:
    """Return the hosts that have a pid or state file, sorted (stray names are left out)."""
    return hosts_with_files()[0]


def is_valid_host(host: str) -> bool:
    """Return True when `host` is a name tunneld uses for files (validate_host would accept it)."""
    return 0 < len(host) <= HOST_NAME_MAX and bool(_HOST_NAME_RE.fullmatch(host)) and ".." not in host
