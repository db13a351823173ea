"""known_hosts evaluated the way OpenSSH's client evaluates it (hostfile.c, match.c), for the paramiko engine.

Hashed names (`|1|salt|hash`), pattern lists with `*`, `?` and `!negation`, `[host]:port`,
`@revoked` and `@cert-authority` markers. Lines that cannot be parsed are skipped, as ssh skips them.
"""

from __future__ import annotations

import base64
import binascii
import logging
import os
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

MAX_FILE_BYTES = 16 * 1024 * 1024
REVOKED = "@revoked"
CERT_AUTHORITY = "@cert-authority"
HASH_MAGIC = "|1|"


@dataclass(frozen=True)
class KnownLine:
    """One usable known_hosts line."""

    path: str
    lineno: int
    marker: str | None
    hosts: str
    key_type: str
    key_blob: bytes

    @property
    def where(self) -> str:
        return f"{self.path} line {self.lineno}"


@dataclass(frozen=True)
class Verdict:
    """What the known_hosts files say about one host name and the key it presented."""

    name: str
    matches: bool = False
    revoked_in: str | None = None
    changed_in: str | None = None
    other_types: tuple[str, ...] = ()
    cert_authority_in: str | None = None


def match_pattern(text: str, pattern: str) -> bool:
    """OpenSSH's match_pattern: `*` any run, `?` one character, everything else literal (no [] classes).

    Iterative, backtracking only to the last `*`: linear in practice, whatever a hostile file holds.
    """
    t = p = 0
    star_p, star_t = -1, 0
    while t < len(text):
        if p < len(pattern) and (pattern[p] == "?" or pattern[p] == text[t]):
            t, p = t + 1, p + 1
        elif p < len(pattern) and pattern[p] == "*":
            star_p, star_t = p, t
            p += 1
        elif star_p >= 0:
            star_t += 1
            t, p = star_t, star_p + 1
        else:
            return False
    return all(c == "*" for c in pattern[p:])


def match_host_list(name: str, patterns: str) -> bool:
    """OpenSSH's match_hostname: a comma list, case-insensitive; a matching `!pattern` vetoes the line."""
    name = name.lower()
    found = False
    for raw in patterns.split(","):
        negated = raw.startswith("!")
        pattern = raw[1:] if negated else raw
        if match_pattern(name, pattern.lower()):
            if negated:
                return False
            found = True
    return found


def _hashed_matches(name: str, entry: str) -> bool:
    import hashlib  # here, not at the top: loading OpenSSL costs the OpenSSH engine's daemon ~4 MiB
    import hmac

    parts = entry[len(HASH_MAGIC) :].split("|")
    if len(parts) != 2:
        return False
    try:
        salt, digest = base64.b64decode(parts[0], validate=True), base64.b64decode(parts[1], validate=True)
    except (binascii.Error, ValueError):
        return False
    mine = hmac.new(salt, name.lower().encode(), hashlib.sha1).digest()
    return hmac.compare_digest(mine, digest)


def line_matches(line: KnownLine, name: str) -> bool:
    """Return True when the line's host field names `name` (hashed, or a pattern list)."""
    if line.hosts.startswith(HASH_MAGIC):
        return _hashed_matches(name, line.hosts)
    return match_host_list(name, line.hosts)


def read_known_hosts(path: Path) -> list[KnownLine]:
    """Return the usable lines of one known_hosts file ([] when it is missing or unreadable)."""
    try:
        with path.open("rb") as handle:
            data = handle.read(MAX_FILE_BYTES + 1)
    except OSError as exc:
        if path.exists():
            log.warning("cannot read %s: %s", path, exc.strerror)
        return []
    if len(data) > MAX_FILE_BYTES:
        log.warning("%s is larger than %d bytes: only its beginning is read", path, MAX_FILE_BYTES)
    lines = []
    for lineno, raw in enumerate(data[:MAX_FILE_BYTES].decode("utf-8", "replace").splitlines(), start=1):
        words = raw.split()
        if not words or words[0].startswith("#"):
            continue
        marker = words[0] if words[0].startswith("@") else None
        if marker is not None:
            words = words[1:]
            if marker not in (REVOKED, CERT_AUTHORITY):
                continue
        if len(words) < 3:
            continue
        try:
            blob = base64.b64decode(words[2], validate=True)
        except (binascii.Error, ValueError):
            continue
        lines.append(KnownLine(str(path), lineno, marker, words[0], words[1], blob))
    return lines


def evaluate(name: str, key_type: str, key_blob: bytes, files: list[Path]) -> Verdict:
    """Check the presented key against every line naming `name`, in every file (OpenSSH's order of verdicts).

    A revoked key is refused even where another line accepts it; otherwise a line with this very
    key accepts it; a line for the same name with a different key of the same type is CHANGED.
    """
    matches = False
    revoked_in = changed_in = cert_in = None
    other: list[str] = []
    for path in files:
        for line in read_known_hosts(path):
            if line.marker == REVOKED:
                if line.key_blob == key_blob and line_matches(line, name):
                    revoked_in = revoked_in or line.where
                continue
            if not line_matches(line, name):
                continue
            if line.marker == CERT_AUTHORITY:
                cert_in = cert_in or line.where
            elif line.key_type == key_type and line.key_blob == key_blob:
                matches = True
            elif line.key_type == key_type:
                changed_in = changed_in or line.where
            elif line.key_type not in other:
                other.append(line.key_type)
    return Verdict(name, matches, revoked_in, changed_in, tuple(other), cert_in)


def known_types(name: str, files: list[Path]) -> tuple[str, ...]:
    """Return the key types plain lines hold for `name` (ssh prefers those host key algorithms)."""
    found: list[str] = []
    for path in files:
        for line in read_known_hosts(path):
            if line.marker is None and line.key_type not in found and line_matches(line, name):
                found.append(line.key_type)
    return tuple(found)


def hash_name(name: str) -> str:
    """Return `|1|salt|hash` for `name`, as `HashKnownHosts yes` writes it."""
    import hashlib
    import hmac

    salt = os.urandom(20)
    digest = hmac.new(salt, name.lower().encode(), hashlib.sha1).digest()
    return f"{HASH_MAGIC}{base64.b64encode(salt).decode()}|{base64.b64encode(digest).decode()}"
