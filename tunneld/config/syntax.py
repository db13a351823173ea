"""ssh_config's syntax as OpenSSH's readconf.c and misc.c read it: keywords and words (quotes, escapes, comments,
`keyword=value`), `*`/`?` patterns, time values, ports, forward and ProxyJump specifications, and how `ssh -G` prints
forwards. Used by the fallback resolver (configfallback) and by the host listing (config.host_lines)."""

from __future__ import annotations

import dataclasses
import re
import socket
from dataclasses import dataclass

from tunneld.config.tokens import expand_path

_TIME_UNITS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


class LineError(Exception):
    """What is wrong with one line, in ssh's words; the reader adds `FILE line N:`."""


def split_words(text: str) -> list[str]:
    """Split a value as OpenSSH's argv_split does: quotes, backslash escapes, a `#` starting a word ends the line."""
    words: list[str] = []
    i = 0
    while i < len(text):
        if text[i] in " \t":
            i += 1
            continue
        if text[i] == "#":
            break
        word, quote = [], ""
        while i < len(text) and (quote or text[i] not in " \t"):
            char, following = text[i], text[i + 1 : i + 2]
            if char == "\\" and following and (following in "'\"\\" or (not quote and following == " ")):
                word.append(following)
                i += 1
            elif not quote and char in "'\"":
                quote = char
            elif quote and char == quote:
                quote = ""
            else:
                word.append(char)
            i += 1
        if quote:
            raise LineError("invalid quotes")
        words.append("".join(word))
    return words


def split_keyword(line: str) -> tuple[str, str]:
    """Return (keyword, rest) as OpenSSH's strdelim splits them, at whitespace or one `=`; ("", "") for none."""
    match = re.match(r'[ \t]*(?P<keyword>[^ \t="]*)[ \t]*(?:=[ \t]*)?(?P<rest>.*)$', line)
    if match is None or not match["keyword"] or match["keyword"].startswith("#"):
        return "", ""
    return match["keyword"].lower(), match["rest"]


def seconds(text: str) -> int:
    """Parse an ssh time value (`90`, `1m30s`) into seconds, as OpenSSH's convtime does."""
    parts = re.findall(r"(\d+)([smhdwSMHDW]?)", text)
    if not parts or "".join(n + u for n, u in parts) != text:
        raise LineError("invalid time value.")
    return sum(int(number) * _TIME_UNITS[unit.lower()] for number, unit in parts)


def port_number(text: str) -> int:
    """Parse a port as OpenSSH's a2port does: 0 to 65535 or a service name; -1 when it is neither."""
    if text.isdigit():
        return int(text) if int(text) <= 65535 else -1
    try:
        return socket.getservbyname(text, "tcp")
    except OSError:
        return -1


def matches(value: str, patterns: list[str]) -> bool:
    """Match as OpenSSH's match_pattern_list: `*` and `?` only, any pattern may match, a matching `!pattern` vetoes."""
    matched = False
    for pattern in patterns:
        regex = re.escape(pattern.removeprefix("!")).replace(r"\*", ".*").replace(r"\?", ".")
        if re.fullmatch(regex, value, re.DOTALL):
            if pattern.startswith("!"):
                return False
            matched = True
    return matched


def jump_hop(hop: str) -> bool:
    match = re.fullmatch(r"(?:ssh://)?(?:[^@\s]+@)?(\[[^\]\s]+\]|[^:@\[\]\s]+)(?::(\d+))?", hop)
    return match is not None and not match[1].startswith("-") and (match[2] is None or 0 < int(match[2]) <= 65535)


@dataclass(frozen=True)
class ParsedForward:
    """One forward as OpenSSH's parse_forward leaves it (a port of -1 is invalid; `socks`: a SOCKS proxy)."""

    listen_host: str | None = None
    listen_port: int = 0
    listen_path: str | None = None
    connect_host: str | None = None
    connect_port: int = 0
    connect_path: str | None = None


def _forward_fields(spec: str) -> list[tuple[str, bool]] | None:
    """Split a forward as OpenSSH's parse_fwd_field does: `:`-separated, `[...]` literal, `\\` escapes; each field
    with whether it is a path (holds a `/`)."""
    fields: list[tuple[str, bool]] = []
    rest = spec
    while rest and len(fields) < 4:
        if rest.startswith("["):
            end = rest.find("]")
            if end < 0 or rest[end + 1 : end + 2] not in (":", ""):
                return None
            fields.append((rest[1:end], "/" in rest[1:end]))
            rest = rest[end + 2 :]
            continue
        match = re.match(r"((?:\\.|[^:\\])*)(?::|$)", rest)
        if match is None:
            return None
        fields.append((re.sub(r"\\(.)", r"\1", match[1]), "/" in re.sub(r"\\.", "", match[1])))
        rest = rest[match.end() :]
    return None if rest else fields


def parse_forward(spec: str, dynamic: bool, remote: bool) -> ParsedForward | None:
    """Parse `LISTEN:TARGET` (the config's two arguments joined by `:`) as OpenSSH's parse_forward does."""
    fields = _forward_fields(spec)
    if not fields or (dynamic and len(fields) > 2):
        return None
    args, paths, port = [f[0] for f in fields], [f[1] for f in fields], port_number
    if len(args) == 1:
        forward = ParsedForward(listen_path=args[0]) if paths[0] else ParsedForward(listen_port=port(args[0]))
        forward = dataclasses.replace(forward, connect_host="socks")
    elif len(args) == 2:
        forward = (ParsedForward(listen_path=args[0], connect_path=args[1]) if paths[0] and paths[1]
                   else ParsedForward(listen_port=port(args[0]), connect_path=args[1]) if paths[1]
                   else ParsedForward(args[0], port(args[1]), connect_host="socks"))  # fmt: skip
    elif len(args) == 3:
        forward = (ParsedForward(listen_path=args[0], connect_host=args[1], connect_port=port(args[2])) if paths[0]
                   else ParsedForward(args[0], port(args[1]), connect_path=args[2]) if paths[2]
                   else ParsedForward(None, port(args[0]), None, args[1], port(args[2])))  # fmt: skip
    else:
        forward = ParsedForward(args[0], port(args[1]), None, args[2], port(args[3]))
    unix = forward.listen_path is not None or forward.connect_path is not None
    if not dynamic and ((len(args) < 3 and not unix) or (forward.connect_port <= 0 and forward.connect_path is None)):
        return None
    if forward.listen_path is None and (forward.listen_port < 0 or (not remote and forward.listen_port == 0)):
        return None
    return forward


def format_forward(keyword: str, forward: ParsedForward, tokens: dict[str, str]) -> str:
    """Print a forward as `ssh -G` does (`5000 [localhost]:5000`, `[*]:8080 [h]:80`), %-tokens in paths expanded."""

    def side(host: str | None, port: int, path: str | None) -> str:
        if path is not None:
            return expand_path(path, tokens, tilde=False)
        return str(port) if host is None else f"[{host}]:{port}"

    listen = side(forward.listen_host, forward.listen_port, forward.listen_path)
    if keyword == "dynamicforward":
        return listen
    return f"{listen} {side(forward.connect_host, forward.connect_port, forward.connect_path)}"


def format_jump(value: str) -> str:
    """Print a ProxyJump as `ssh -G` does: the hops before the last as written, the last without `ssh://`."""
    extra, _, last = value.rpartition(",")
    return f"{extra}," * bool(extra) + last.strip().removeprefix("ssh://")


def forward_hint(line: str) -> str | None:
    """Return how to fix a LocalForward/RemoteForward line ssh refused (None for any other line): ssh -L's one-word
    `5000:localhost:5050` becomes the two arguments ssh_config wants, `5000 localhost:5050`."""
    keyword, rest = split_keyword(line)
    name = {"localforward": "LocalForward", "remoteforward": "RemoteForward"}.get(keyword)
    if name is None:
        return None
    try:
        words = split_words(rest)
    except LineError:
        return None
    fields = re.findall(r"\[[^\]]*\]|[^:]+", words[0]) if len(words) == 1 else []
    if len(fields) in (3, 4):
        listen, target = ":".join(fields[:-2]), ":".join(fields[-2:])
        return f"{name} takes two arguments, not ssh -L's one: write `{name} {listen} {target}`"
    return f"{name} takes the listen port (or address:port) and the target host:port, e.g. `{name} 5000 localhost:5000`"
