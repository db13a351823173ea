"""Desktop notifications: a host lost for longer than `notify_after_s`, and the same host back.

A blip shorter than `notify_after_s` says nothing. Each state change notifies at most once, and the
notifier program (notify-send on Linux desktops, osascript on macOS) runs in a thread of its own: a hung
notifier never holds up the supervisor. Where neither program exists, nothing is shown.

The text is plain: notify-send's servers render markup (`<a href>`, `<img>`, `&entities;`) and
notify-send itself expands backslash escapes, so a reason that quotes the network would reach the
desktop as markup. Only the first line of tunneld's message is shown, without control characters,
backslashes or `<>&`, and quoted text (the peer's, where a message quotes it) is short.

A fatal error (a changed host key) notifies at once, and the supervisor process flushes its
notifications before it exits (close): the notice users most need is the one sent as the process ends.
"""

from __future__ import annotations

import logging
import re
import subprocess
import sys
import threading
import time
from collections.abc import Callable

from tunneld.safetext import printable
from tunneld.state.paths import find_program
from tunneld.states import DEGRADED, FAILED, IDLE, NEEDS_AUTH, STARTING, STOPPED, UP

log = logging.getLogger(__name__)

NOTIFIER_TIMEOUT_S = 10.0
FLUSH_MARGIN_S = 1.0  # past the notifier's own cap: time to kill a hung one and reap it
REASON_MAX = 160
QUOTED_MAX = 60
Send = Callable[[str, str], None]

_QUOTED_RE = re.compile(r'"([^"]*)"')
# A line break as safetext.printable shows it: messages (and so state files) carry a peer's line breaks so.
_LINE_BREAK_RE = re.compile(r"\\x0[abcd]|\\x1[cde]|\\x85|\\u202[89]")
# What markup (<b>, <a href>, <img>, &lt;) and notify-send's own escapes (\n, \033) are made of.
_PLAIN = str.maketrans("", "", "<>&\\")


def plain_text(text: str, limit: int) -> str:
    """Return `text` as one line of plain text for a notification, at most `limit` characters.

    The first non-blank line only (a line break may be shown as `\\x0a` already: tunneld's messages are
    printable); control characters made visible (safetext.printable), then every `<`, `>`, `&` and
    backslash dropped, the stuff of markup and of notify-send's escapes (ESC shows as `x1b`); quoted
    text (a peer's words, as tunneld's messages quote them) cut to QUOTED_MAX characters.
    """
    lines = _LINE_BREAK_RE.split(printable(text))
    line = next((line.strip() for line in lines if line.strip()), "")
    line = _QUOTED_RE.sub(_short_quote, line).translate(_PLAIN)
    return line if len(line) <= limit else line[: limit - 1] + "\u2026"


def _short_quote(match: re.Match[str]) -> str:
    quoted = match[1]
    return f'"{quoted}"' if len(quoted) <= QUOTED_MAX else f'"{quoted[: QUOTED_MAX - 1]}\u2026"'


def notifier_argv(title: str, body: str) -> list[str] | None:
    """Return the command that shows one notification on this desktop, or None when there is no notifier."""
    if sys.platform == "darwin":
        program = find_program("osascript")

        def quoted(text: str) -> str:  # an AppleScript string literal
            return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'

        script = f"display notification {quoted(body)} with title {quoted(title)}"
        return [program, "-e", script] if program else None
    program = find_program("notify-send")
    return [program, "--app-name=tunneld", title, body] if program else None


def run_notifier(title: str, body: str) -> None:
    """Show one notification; runs in its own thread, and gives a hung notifier NOTIFIER_TIMEOUT_S."""
    argv = notifier_argv(title, body)
    if argv is None:
        return
    try:
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    except OSError as exc:
        log.warning("cannot run %s: %s", argv[0], exc)
        return
    try:
        proc.wait(NOTIFIER_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


class DesktopNotices:
    """Turns the supervisor's state changes into at most one "lost" and one "back" notification per outage."""

    def __init__(self, host: str, after_s: float, send: Send | None = None) -> None:
        self.host = host
        self.after_s = after_s
        self._send = send or run_notifier
        self._lock = threading.Lock()
        self._was_up = False
        self._down_since: float | None = None  # monotonic; set while a host that was up is not
        self._reason = ""
        self._told_lost = False
        self._timer: threading.Timer | None = None
        self._senders: list[threading.Thread] = []
        self._closed = False

    def observe(self, state: str, last_error: dict[str, object] | None) -> None:
        """Take one published state; returns at once (notifying happens in other threads)."""
        with self._lock:
            if self._closed:
                return
            if state in (UP, DEGRADED) or (state == IDLE and not last_error):  # idle: on demand, nothing wrong
                self._back()
            elif state == STOPPED:  # asked for: nothing to tell
                self._reset()
            elif state == NEEDS_AUTH:  # the user must act: say so at once, once per episode
                self._needs_auth(last_error)
            elif state != STARTING and self._was_up:
                if last_error and last_error.get("message"):
                    self._reason = plain_text(str(last_error["message"]), REASON_MAX)
                if self._down_since is None:
                    self._down_since = time.monotonic()
                    if state != FAILED:
                        self._timer = threading.Timer(self.after_s, self._lost)
                        self._timer.daemon = True
                        self._timer.start()
                if state == FAILED and not self._told_lost:  # fatal: no blip to wait for, and the process ends
                    self._cancel()
                    self._tell_lost()

    def close(self) -> None:
        """Flush before the process exits: drop a pending "lost" (a blip, or a stop), and wait for the
        notifications already sent (a fatal error's) to be shown, each notifier within NOTIFIER_TIMEOUT_S."""
        with self._lock:
            self._closed = True
            self._cancel()
            senders = list(self._senders)
        deadline = time.monotonic() + NOTIFIER_TIMEOUT_S + FLUSH_MARGIN_S
        for thread in senders:
            thread.join(max(0.0, deadline - time.monotonic()))

    def _lost(self) -> None:
        with self._lock:
            if not self._closed and self._down_since is not None and not self._told_lost:
                self._tell_lost()

    def _tell_lost(self) -> None:
        """Notify that the host is down (the lock is held)."""
        assert self._down_since is not None
        self._told_lost = True
        down_s = time.monotonic() - self._down_since
        reason = self._reason or "no reason recorded"
        self._notify(f"tunneld: {self.host} is down", f"no connection for {down_s:.0f} s: {reason}")

    def _needs_auth(self, last_error: dict[str, object] | None) -> None:
        """Tell the user what to run (the lock is held); the host comes back by itself once they did."""
        self._cancel()
        if self._down_since is None:
            self._down_since = time.monotonic()
        if self._told_lost:
            return
        self._told_lost = True
        message = str(last_error.get("message", "")) if last_error else ""
        hint = str(last_error.get("hint", "")) if last_error else ""
        reason = message.split(": ", 1)[-1] if ": " in message else message
        action = f"run: tunneld login {self.host}" if "tunneld login" in hint else "run ssh-add or unlock your agent"
        self._notify(f"tunneld: {self.host} needs your key", f"{action}; it reconnects by itself ({reason})")

    def _back(self) -> None:
        if self._told_lost and self._down_since is not None:
            down_s = time.monotonic() - self._down_since
            self._notify(f"tunneld: {self.host} is back", f"up again after {down_s:.0f} s")
        self._reset()
        self._was_up = True

    def _reset(self) -> None:
        self._cancel()
        self._down_since = None
        self._told_lost = False
        self._reason = ""

    def _cancel(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _notify(self, title: str, body: str) -> None:
        """Show one notification from a thread of its own (the lock is held); close() waits for it."""
        title, body = plain_text(title, REASON_MAX), plain_text(body, REASON_MAX + 40)
        log.info("%s: notifying the desktop: %s: %s", self.host, title, body)
        sender = threading.Thread(target=self._send, args=(title, body), name="notify", daemon=True)
        self._senders = [thread for thread in self._senders if thread.is_alive()]
        self._senders.append(sender)
        sender.start()
