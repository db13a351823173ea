"""Resolve a host where no `ssh` binary exists: ssh_config read as OpenSSH 9's readconf.c reads it (its syntax in
configsyntax) and printed as `ssh -G` prints it (the parts tunneld uses), so that config.resolve_host treats both alike.

It follows `Host` (patterns, `!`, case-sensitive) and `Match host|originalhost|user|localuser|all` (with `!`),
`Include` (globs sorted, relative to ~/.ssh or /etc/ssh; the including block's state restored after), ssh's word
splitting (quotes, backslash escapes, `#` comments, `keyword=value`), first value wins, accumulated forwards and
IdentityFiles (duplicates dropped), the default IdentityFiles, and the `~`, `%` and `${VAR}` expansions of `ssh -G`.
"""

from __future__ import annotations

import glob
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from tunneld.config.spec import DEFAULT_IDENTITY_NAMES, parse_jump
from tunneld.config.syntax import (
    LineError,
    ParsedForward,
    format_forward,
    format_jump,
    forward_hint,
    jump_hop,
    matches,
    parse_forward,
    port_number,
    seconds,
    split_keyword,
    split_words,
)
from tunneld.config.tokens import expand_path, expand_tokens, local_user, token_table
from tunneld.errors import ConfigError

RESOLVER = "tunneld's own ssh_config reader (no ssh binary on PATH)"
LIMITS = (
    "without an ssh binary tunneld reads ssh_config itself, as OpenSSH 9 does, but never matches Match exec, "
    "canonical or final, does not canonicalize host names and takes algorithm lists as written; "
    "install openssh-client for exact resolution"
)
SYSTEM_CONFIG = Path("/etc/ssh/ssh_config")
MAX_INCLUDE_DEPTH = 16
MAX_CONFIG_BYTES = 1024 * 1024
_ALIASES = {"identityfile2": "identityfile", "keepalive": "tcpkeepalive", "smartcarddevice": "pkcs11provider",
            "challengeresponseauthentication": "kbdinteractiveauthentication",
            "skeyauthentication": "kbdinteractiveauthentication", "tisauthentication": "kbdinteractiveauthentication",
            "dsaauthentication": "pubkeyauthentication", "hostbasedkeytypes": "hostbasedacceptedalgorithms",
            "pubkeyacceptedkeytypes": "pubkeyacceptedalgorithms"}  # fmt: skip
# Every other keyword OpenSSH 9's client knows (readconf.c; Debian's GSSAPI ones; a few of 9.3-9.9).
_KEYWORD_LIST = (
    "protocol cipher fallbacktorsh globalknownhostsfile2 rhostsauthentication userknownhostsfile2 useroaming usersh "
    "useprivilegedport afstokenpassing kerberosauthentication kerberostgtpassing rsaauthentication "
    "rhostsrsaauthentication compressionlevel gssapiauthentication gssapidelegatecredentials gssapikeyexchange "
    "gssapiclientidentity gssapiserveridentity gssapirenewalforcesrekey gssapitrustdns gssapikexalgorithms "
    "pkcs11provider forwardagent forwardx11 forwardx11trusted forwardx11timeout exitonforwardfailure xauthlocation "
    "gatewayports passwordauthentication kbdinteractiveauthentication kbdinteractivedevices pubkeyauthentication "
    "hostbasedauthentication identityfile identitiesonly certificatefile addkeystoagent identityagent hostname "
    "hostkeyalias proxycommand port ciphers macs remoteforward localforward permitremoteopen user host match "
    "escapechar globalknownhostsfile userknownhostsfile connectionattempts batchmode checkhostip "
    "stricthostkeychecking compression tcpkeepalive numberofpasswordprompts syslogfacility loglevel logverbose "
    "dynamicforward preferredauthentications hostkeyalgorithms casignaturealgorithms bindaddress bindinterface "
    "clearallforwardings enablesshkeysign verifyhostkeydns nohostauthenticationforlocalhost rekeylimit connecttimeout "
    "addressfamily serveraliveinterval serveralivecountmax sendenv setenv controlpath controlmaster controlpersist "
    "hashknownhosts include tunnel tunneldevice localcommand permitlocalcommand remotecommand visualhostkey "
    "kexalgorithms ipqos requesttty sessiontype stdinnull forkafterauthentication proxyusefdpass canonicaldomains "
    "canonicalizefallbacklocal canonicalizehostname canonicalizemaxdots canonicalizepermittedcnames "
    "streamlocalbindmask streamlocalbindunlink revokedhostkeys fingerprinthash updatehostkeys "
    "hostbasedacceptedalgorithms pubkeyacceptedalgorithms ignoreunknown proxyjump securitykeyprovider "
    "knownhostscommand requiredrsasize enableescapecommandline obscurekeystroketiming channeltimeout tag "
    "refuseconnection warnweakcrypto versionaddendum"
)
KEYWORDS = frozenset(_KEYWORD_LIST.split())
_ACCUMULATED = ("identityfile", "certificatefile", "sendenv", "setenv")
_FORWARDS = ("dynamicforward", "localforward", "remoteforward")  # in the order `ssh -G` prints them
_RAW_REST = ("proxycommand", "localcommand", "remotecommand", "knownhostscommand")  # the rest of the line, verbatim
_MULTI_ARGS = ("userknownhostsfile", "globalknownhostsfile", "sendenv", "setenv", "canonicaldomains", "ipqos",
               "rekeylimit", "canonicalizepermittedcnames", "channeltimeout", "ignoreunknown")  # fmt: skip
_FLAG = {"yes": "yes", "true": "yes", "no": "no", "false": "no"}
_FLAGS = ("identitiesonly", "gatewayports", "hashknownhosts", "permitlocalcommand", "forwardx11", "batchmode",
          "exitonforwardfailure", "clearallforwardings", "compression", "tcpkeepalive", "checkhostip",
          "proxyusefdpass", "streamlocalbindunlink", "visualhostkey", "forwardx11trusted")  # fmt: skip
_CHOICES = {  # what `ssh -G` prints for each accepted word
    "stricthostkeychecking": {"yes": "true", "true": "true", "no": "false", "false": "false", "off": "false",
                              "ask": "ask", "accept-new": "accept-new"},
    "verifyhostkeydns": {"yes": "true", "true": "true", "no": "false", "false": "false", "ask": "ask"},
    "addressfamily": {"any": "any", "inet": "inet", "inet6": "inet6"},
    **{flag: _FLAG for flag in _FLAGS},
}  # fmt: skip
_TIMES = ("connecttimeout", "serveraliveinterval", "forwardx11timeout")
_DEFAULTS = {"stricthostkeychecking": "ask", "serveraliveinterval": "0", "serveralivecountmax": "3",
             "connecttimeout": "none", "userknownhostsfile": "~/.ssh/known_hosts ~/.ssh/known_hosts2",
             "globalknownhostsfile": "/etc/ssh/ssh_known_hosts /etc/ssh/ssh_known_hosts2", "addressfamily": "any",
             "forwardagent": "no", "forwardx11": "no", "gatewayports": "no", "hashknownhosts": "no",
             "permitlocalcommand": "no", "verifyhostkeydns": "false", "identitiesonly": "no"}  # fmt: skip
_EXPANDED = ("userknownhostsfile", "controlpath", "identityagent")  # what `ssh -G` prints expanded


def _checked(keyword: str, word: str) -> str:
    """Validate a value as ssh does (whether or not its block applies); return what `ssh -G` prints for it."""
    if keyword == "port":
        if port_number(word) <= 0:
            raise LineError(f"Bad port '{word}'.")
        return str(port_number(word))
    if keyword in _TIMES:
        return str(seconds(word))
    if keyword == "serveralivecountmax" and not word.isdigit():
        raise LineError("integer value invalid.")
    if keyword == "forwardagent":  # a flag, or the path of an agent's socket
        return _FLAG.get(word.lower(), word)
    if keyword in _CHOICES:
        if word.lower() not in _CHOICES[keyword]:
            raise LineError(f'unsupported option "{word}".')
        return _CHOICES[keyword][word.lower()]
    return word.lower() if keyword in ("hostname", "hostkeyalias") else word


@dataclass
class _Reader:
    """One resolution of `alias`: the options set so far (first value wins; forwards and identities accumulate)."""

    alias: str
    home: str
    values: dict[str, list[str]] = field(default_factory=dict)
    forwards: dict[str, list[ParsedForward]] = field(default_factory=dict)
    ignore_unknown: list[str] = field(default_factory=list)

    def read(self, path: Path, user_config: bool, active: bool = True, depth: int = 0, never: bool = False) -> None:
        """Read one file. An Include reads others in the including block's state, restored after; one in a block that
        does not apply matches nothing (`never`)."""
        try:
            with path.open("rb") as handle:
                text = handle.read(MAX_CONFIG_BYTES).decode("utf-8", errors="replace")
        except OSError as exc:
            raise ConfigError(f"cannot read ssh_config {path}: {exc.strerror}") from exc
        state = {"active": active, "never": never}
        for number, line in enumerate(text.splitlines(), start=1):
            try:
                self._line(line.rstrip(" \t\r\f"), user_config, state, depth)
            except LineError as error:
                raise ConfigError(f"{path} line {number}: {error}", forward_hint(line) or "fix that line") from None

    def _line(self, line: str, user_config: bool, state: dict[str, bool], depth: int) -> None:
        keyword, rest = split_keyword(line)
        if not keyword:
            return
        if not rest:
            raise LineError(f'no argument after keyword "{keyword}"')
        keyword = _ALIASES.get(keyword, keyword)
        if keyword not in KEYWORDS:
            if not matches(keyword, self.ignore_unknown):
                raise LineError(f"Bad configuration option: {keyword}")
        elif keyword in _RAW_REST or keyword == "proxyjump":
            self._command(keyword, rest, state["active"])
        elif keyword in ("host", "match"):
            words = split_words(rest)
            if keyword == "host" and not all(words):
                raise LineError("keyword host empty argument")
            matched = matches(self.alias, words) if keyword == "host" else self._match(words)
            state["active"] = matched and not state["never"]
        elif keyword == "include":
            for pattern in split_words(rest):
                self._include(pattern, user_config, state, depth)
        elif keyword in _FORWARDS:
            self._forward(keyword, split_words(rest), state["active"])
        else:
            self._option(keyword, split_words(rest), state["active"])

    def _option(self, keyword: str, words: list[str], active: bool) -> None:
        if not words:
            raise LineError("Missing argument.")
        if len(words) > 1 and keyword not in _MULTI_ARGS:
            raise LineError(f"keyword {keyword} extra arguments at end of line")
        words = [_checked(keyword, word) for word in words]
        if keyword == "ignoreunknown" and "ignoreunknown" not in self.values:
            self.ignore_unknown = [pattern.lower() for word in words for pattern in word.split(",")]
        if not active:
            return
        if keyword in _ACCUMULATED:
            found = self.values.setdefault(keyword, [])
            found += [word for word in words if word not in found]
        else:
            self.values.setdefault(keyword, words)

    def _command(self, keyword: str, rest: str, active: bool) -> None:
        """ProxyCommand and friends take the rest of the line as written; the first of ProxyJump and ProxyCommand
        wins (`ProxyJump none` holds off later ProxyJumps only)."""
        if keyword == "proxyjump":
            rest = rest.split("#", 1)[0].rstrip()
            if rest.lower() != "none" and not all(jump_hop(hop) for hop in rest.split(",")):
                raise LineError(f'Invalid ProxyJump "{rest}"')
            active = active and "proxycommand" not in self.values
        elif keyword == "proxycommand":
            active = active and self.values.get("proxyjump", ["none"])[0].lower() == "none"
        if active:
            self.values.setdefault(keyword, [rest])

    def _match(self, words: list[str]) -> bool:
        """Evaluate a Match line as OpenSSH 9 does; exec, canonical and final never match here."""
        result, i = True, 0
        while i < len(words):
            negate, criterion = words[i].startswith("!"), words[i].removeprefix("!").lower()
            i += 1
            if criterion == "all":
                if len(words) > 1:
                    raise LineError("Bad Match condition")
                return not negate
            if criterion in ("canonical", "final"):
                result = result and negate
                continue
            if i >= len(words) or criterion not in ("host", "originalhost", "user", "localuser", "exec"):
                raise LineError("Bad Match condition")
            argument, i = words[i], i + 1
            if criterion in ("host", "originalhost"):
                host = self._match_host() if criterion == "host" else self.alias
                hit = matches(host.lower(), argument.lower().split(","))
            elif criterion in ("user", "localuser"):
                user = self.values.get("user", [local_user()])[0] if criterion == "user" else local_user()
                hit = matches(user, argument.split(","))
            else:
                hit = negate  # exec: never matches, negated or not
            result = result and hit != negate
        return result

    def _match_host(self) -> str:
        hostname = self.values.get("hostname")
        return _expand_hostname(hostname[0], self.alias) if hostname else self.alias

    def _include(self, pattern: str, user_config: bool, state: dict[str, bool], depth: int) -> None:
        if pattern.startswith("~"):
            pattern = expand_tokens(pattern, {"d": self.home})
        elif not os.path.isabs(pattern):
            pattern = os.path.join(self.home, ".ssh", pattern) if user_config else str(SYSTEM_CONFIG.parent / pattern)
        for path in sorted(glob.glob(pattern)):
            if depth >= MAX_INCLUDE_DEPTH:
                raise LineError("Include nested too deeply")
            if os.path.isfile(path):
                self.read(Path(path), user_config, state["active"], depth + 1, state["never"] or not state["active"])

    def _forward(self, keyword: str, words: list[str], active: bool) -> None:
        if not words or not words[0]:
            raise LineError("Missing port argument.")
        remote, dynamic = keyword == "remoteforward", keyword == "dynamicforward"
        if not dynamic and len(words) < 2:
            if not remote:
                raise LineError("Missing target argument.")
            dynamic = True  # a RemoteForward with one argument is a SOCKS proxy on the server's side
        if len(words) > (1 if dynamic else 2):
            raise LineError(f"keyword {keyword} extra arguments at end of line")
        forward = parse_forward(":".join(words), dynamic, remote)
        if forward is None:
            raise LineError("Bad forwarding specification.")
        found = self.forwards.setdefault(keyword, [])
        if active and forward not in found:
            found.append(forward)


def _expand_hostname(value: str, alias: str) -> str:
    return re.sub(r"%([%h])", lambda m: alias if m[1] == "h" else "%", value)


def config_pairs(alias: str, ssh_config: str | None, home: str) -> list[tuple[str, str]]:
    """Return `ssh -G`-like (keyword, value) lines for `alias` from the ssh_config files ssh would read."""
    user_given, _, host = alias.rpartition("@")
    reader = _Reader(host, home)
    if user_given:
        reader.values["user"] = [user_given]
    if ssh_config:
        if not Path(ssh_config).is_file():
            raise ConfigError(f"cannot read ssh_config {ssh_config}: no such file")
        reader.read(Path(ssh_config), user_config=True)
    else:
        for path, user_config in ((Path(home) / ".ssh" / "config", True), (SYSTEM_CONFIG, False)):
            if path.is_file():
                reader.read(path, user_config)
    return list(_pairs(reader))


def _pairs(reader: _Reader) -> Iterator[tuple[str, str]]:
    values = {key: words for key, words in reader.values.items() if key not in _ACCUMULATED}
    hostname = _expand_hostname(values.pop("hostname", [reader.alias])[0], reader.alias).lower()
    user, port = values.pop("user", [local_user()])[0], values.pop("port", ["22"])[0]
    jump = format_jump(values.pop("proxyjump", ["none"])[0])
    tokens = token_table(reader.alias, hostname, int(port), user)
    jump_host = parse_jump(jump.rsplit(",", 1)[-1], 0)[0] if jump.lower() != "none" else ""
    tokens.update(j=jump_host, k=values.get("hostkeyalias", [reader.alias])[0])
    yield from (("hostname", hostname), ("user", user), ("port", port), ("proxyjump", jump))
    for key, default in _DEFAULTS.items():
        values.setdefault(key, default.split())
    for key, words in values.items():
        value = " ".join(words)
        if key in _EXPANDED and value.lower() not in ("none", "ssh_auth_sock"):
            value = " ".join(expand_path(word, tokens) for word in words)
        yield key, value
    identities = reader.values.get("identityfile") or [f"~/.ssh/{name}" for name in DEFAULT_IDENTITY_NAMES]
    yield from (("identityfile", path) for path in identities)
    yield from (("certificatefile", path) for path in reader.values.get("certificatefile", []))
    for keyword in _FORWARDS:
        yield from ((keyword, format_forward(keyword, forward, tokens)) for forward in reader.forwards.get(keyword, []))
