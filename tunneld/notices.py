"""Desktop notifications: a host lost for longer than `notify_after_s`, and the same host back.

A blip shorter than `notify_after_s` says nothing. Each state change notifies at most once, and the
notifier program (notify-send on Linux desktops, osascript on macOS) runs in a thread of its own: a hung
notifier never holds up the supervisor. Where neither program exists, nothing is shown.
"""

from __future__ import annotations

import logging
import subprocess
import sys
import threading
import time
from collections.abc import Callable

from tunneld.paths import find_program
from tunneld.safetext import printable
from tunneld.states import DEGRADED, FAILED, IDLE, STARTING, STOPPED, UP

log = logging.getLogger(__name__)

NOTIFIER_TIMEOUT_S = 10.0
REASON_MAX = 200
Send = Callable[[str, str], None]


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

    def observe(self, state: str, last_error: dict[str, object] | None) -> None:
        """Take one published state; returns at once (notifying happens in other threads)."""
        with self._lock:
            if state in (UP, DEGRADED) or (state == IDLE and not last_error):  # idle: on demand, nothing wrong
                self._back()
            elif state == STOPPED:  # asked for: nothing to tell
                self._reset()
            elif state != STARTING and self._was_up:
                if last_error and last_error.get("message"):
                    self._reason = printable(str(last_error["message"]))[:REASON_MAX]
                if self._down_since is None:
                    self._down_since = time.monotonic()
                    self._timer = threading.Timer(0 if state == FAILED else self.after_s, self._lost)
                    self._timer.daemon = True
                    self._timer.start()
                elif state == FAILED and not self._told_lost:  # fatal: no point waiting for the blip to pass
                    self._cancel()
                    self._timer = threading.Timer(0, self._lost)
                    self._timer.daemon = True
                    self._timer.start()

    def close(self) -> None:
        """Cancel a pending notification (the supervisor is exiting)."""
        with self._lock:
            self._cancel()

    def _lost(self) -> None:
        with self._lock:
            if self._down_since is None or self._told_lost:
                return
            self._told_lost = True
            down_s = time.monotonic() - self._down_since
            reason = self._reason or "no reason recorded"
        self._notify(f"tunneld: {self.host} is down", f"no connection for {down_s:.0f} s: {reason}")

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
        log.info("%s: notifying the desktop: %s: %s", self.host, title, body)
        threading.Thread(target=self._send, args=(title, body), name="notify", daemon=True).start()
