"""Text from the network or from disk made safe for a terminal and a log: control characters become visible.

A server banner or error string may carry terminal escapes (OSC 52 writes the clipboard, others
retitle windows or hide text); a newline may forge a log line. Every such string passes through
`printable` before it is stored, logged or printed.
"""

from __future__ import annotations

import re

# C0 controls, DEL, C1 controls, and the Unicode bidirectional overrides that reorder what is shown.
_UNSAFE_RE = re.compile("[\x00-\x1f\x7f-\x9f\u202a-\u202e\u2066-\u2069]")
_UNSAFE_KEEP_NEWLINES_RE = re.compile("[\x00-\x09\x0b-\x1f\x7f-\x9f\u202a-\u202e\u2066-\u2069]")


def _visible(match: re.Match[str]) -> str:
    code = ord(match[0])
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


def printable(text: str, keep_newlines: bool = False) -> str:
    """Return `text` with every control character shown as an escape (`\\x1b`), newlines too unless kept."""
    pattern = _UNSAFE_KEEP_NEWLINES_RE if keep_newlines else _UNSAFE_RE
    return pattern.sub(_visible, text)


PEER_TEXT_MAX_CHARS = 100


def quote_peer(text: str, limit: int = PEER_TEXT_MAX_CHARS) -> str:
    """Return text a peer chose (a banner line, a disconnect reason) as tunneld shows it: escaped, at most
    `limit` characters (then "..."), in double quotes, so it can never pass for tunneld's or ssh's own words."""
    shown = ""
    for char in text.strip():
        piece = '\\"' if char == '"' else "\\\\" if char == "\\" else printable(char)
        if len(shown) + len(piece) > limit:
            return f'"{shown}..."'
        shown += piece
    return f'"{shown}"'
