"""Desktop notifications: one "down" and one "back" around an outage longer than notify_after_s, none for a blip.

The real test puts a fake `notify-send` first on PATH (the one OS edge faked) and restarts a real sshd.
"""

from __future__ import annotations

import os
import re
import threading
import time
from pathlib import Path

import pytest

from tests.harness import EchoServer, SshServer, free_port, wait_for
from tests.helpers import ForegroundTunnel, run_cli, start, write_config, write_settings
from tunneld.errors import EXIT_CONFIG, ConnectError
from tunneld.runtime.notices import DesktopNotices, notifier_argv, plain_text
from tunneld.states import BACKOFF, CONNECTING, FAILED, IDLE, LOST, NEEDS_AUTH, STARTING, STOPPED, UP

NOTIFY_AFTER_S = 3


@pytest.fixture
def notify_send(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A fake notify-send first on PATH; each call appends its arguments as one line to the returned file."""
    bindir = tmp_path / "bin"
    bindir.mkdir()
    record = tmp_path / "notifications"
    record.touch()
    script = bindir / "notify-send"
    script.write_text(f'#!/bin/sh\nprintf "%s|" "$@" >> {record}\necho >> {record}\n')
    script.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bindir}:{os.environ['PATH']}")
    return record


@pytest.mark.slow
def test_a_long_outage_notifies_lost_and_restored_once_a_blip_says_nothing(
    tmp_path: Path, sshd: SshServer, echo: EchoServer, notify_send: Path, foreground: list[ForegroundTunnel]
) -> None:
    port = free_port()
    config = write_config(tmp_path, sshd.client_config("noisy", [f"LocalForward {port} 127.0.0.1:{echo.port}"]))
    write_settings(f"notify_after_s = {NOTIFY_AFTER_S}\n")  # `run` keeps trying: notifications are on by default
    tunnel = start(foreground, "noisy", config, "openssh")
    tunnel.wait_state("up")
    sshd.stop()  # a blip: back well within notify_after_s
    tunnel.wait_state("lost", "backoff", "connecting")
    sshd.start()
    tunnel.wait_state("up")
    time.sleep(NOTIFY_AFTER_S + 1)
    assert notify_send.read_text() == "", "a blip shorter than notify_after_s must not notify"
    sshd.stop()  # an outage: longer than notify_after_s
    wait_for(lambda: notify_send.read_text().count("\n") == 1, NOTIFY_AFTER_S + 15, "the 'down' notification")
    sshd.start()
    tunnel.wait_state("up")
    wait_for(lambda: notify_send.read_text().count("\n") == 2, 15, "the 'back' notification")
    time.sleep(1)
    lost, back = notify_send.read_text().splitlines()
    assert lost.startswith("--app-name=tunneld|tunneld: noisy is down|no connection for "), lost
    assert "127.0.0.1" in lost or "refused" in lost.lower() or "closed" in lost.lower(), lost  # ssh's reason
    assert back.startswith("--app-name=tunneld|tunneld: noisy is back|up again after "), back


def test_a_plain_start_does_not_notify_unless_asked(
    tmp_path: Path, sshd: SshServer, echo: EchoServer, notify_send: Path
) -> None:
    port = free_port()
    config = write_config(tmp_path, sshd.client_config("quiet", [f"LocalForward {port} 127.0.0.1:{echo.port}"]))
    write_settings("notify_after_s = 0\n")
    try:
        assert run_cli("start", "quiet", "-F", str(config)).returncode == 0
        sshd.stop()
        time.sleep(3)
        assert notify_send.read_text() == ""  # default off for `start` (on for autostart, which keeps trying)
    finally:
        run_cli("stop", "quiet")


class Recorder:
    """A notifier that records what it was asked to show, optionally blocking like a hung notify-send."""

    def __init__(self, block: threading.Event | None = None) -> None:
        self.sent: list[tuple[str, str]] = []
        self.block = block
        self.called = threading.Event()

    def __call__(self, title: str, body: str) -> None:
        self.sent.append((title, body))
        self.called.set()
        if self.block is not None:
            self.block.wait(30)


def test_a_hung_notifier_never_holds_up_the_supervisor() -> None:
    release = threading.Event()
    recorder = Recorder(block=release)
    notices = DesktopNotices("h", after_s=0, send=recorder)
    try:
        notices.observe(UP, None)
        notices.observe(LOST, {"message": "Connection closed"})
        assert recorder.called.wait(5)
        began = time.monotonic()
        for state in (BACKOFF, CONNECTING, UP, LOST, UP):
            notices.observe(state, None)
        assert time.monotonic() - began < 0.5  # observe returned at once though the notifier still hangs
    finally:
        release.set()
        notices.close()


def test_one_notification_per_state_change_and_none_before_the_first_up() -> None:
    recorder = Recorder()
    notices = DesktopNotices("h", after_s=0.2, send=recorder)
    notices.observe(STARTING, None)
    notices.observe(FAILED, {"message": "refused"})  # never up: the foreground `start` said it
    time.sleep(0.4)
    assert recorder.sent == []
    notices.observe(UP, None)
    for state in (LOST, BACKOFF, CONNECTING, BACKOFF):  # one outage, many states
        notices.observe(state, {"message": "Connection refused\x1b]52;c;x\x07"})
    wait_for(lambda: len(recorder.sent) == 1, 5, "one 'down' notification")
    notices.observe(UP, None)
    notices.observe(UP, None)
    wait_for(lambda: len(recorder.sent) == 2, 5, "one 'back' notification")
    notices.observe(IDLE, None)  # on demand, nothing wrong: not an outage
    notices.observe(STOPPED, None)
    time.sleep(0.4)
    (down_title, down_body), (back_title, _) = recorder.sent
    assert down_title == "tunneld: h is down" and "\x1b" not in down_body and "Connection refused" in down_body
    assert back_title == "tunneld: h is back" and len(recorder.sent) == 2


def test_no_notifier_program_means_no_command(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))
    assert notifier_argv("t", "b") is None


def test_a_fatal_error_after_up_notifies_at_once() -> None:
    recorder = Recorder()
    notices = DesktopNotices("h", after_s=60, send=recorder)  # a loss would wait a minute; a fatal error does not
    notices.observe(UP, None)
    notices.observe(LOST, {"message": "Connection closed"})
    notices.observe(FAILED, {"message": "the host key of h changed"})
    wait_for(lambda: len(recorder.sent) == 1, 5, "the 'down' notification of a fatal error")
    notices.close()
    assert recorder.sent[0][0] == "tunneld: h is down" and "host key of h changed" in recorder.sent[0][1]


def test_needs_auth_notifies_at_once_once_and_back_when_the_key_is_loaded() -> None:
    recorder = Recorder()
    notices = DesktopNotices("ml", after_s=60, send=recorder)
    notices.observe(UP, None)
    notices.observe(LOST, {"message": "Connection closed"})
    waiting: dict[str, object] = {"message": "ml needs your key: the agent has no key for u@h:22 (emptied or locked)",
               "hint": "load your key with `ssh-add`"}  # fmt: skip
    for _ in range(3):  # each retry after a change of the agent publishes needs-auth again
        notices.observe(CONNECTING, None)
        notices.observe(NEEDS_AUTH, waiting)
    wait_for(lambda: len(recorder.sent) == 1, 5, "the needs-auth notification")
    notices.observe(UP, None)
    wait_for(lambda: len(recorder.sent) == 2, 5, "the 'back' notification")
    notices.close()
    (title, body), (back, _) = recorder.sent
    assert title == "tunneld: ml needs your key" and body.startswith("run ssh-add"), body
    assert "the agent has no key for u@h:22" in body and back == "tunneld: ml is back"


def test_closing_while_a_loss_is_still_within_notify_after_s_says_nothing() -> None:
    recorder = Recorder()
    notices = DesktopNotices("h", after_s=60, send=recorder)
    notices.observe(UP, None)
    notices.observe(LOST, {"message": "Connection closed"})  # a blip so far
    notices.close()  # the supervisor exits (a stop): the flush sends only what was decided
    assert recorder.sent == []


HOSTILE_REASON = (
    'Received disconnect from 127.0.0.1 port 22:2: <a href="x">update</a> <img src=x> \\033[31mred\x1b[0m '
    "C:\\temp & co\nsecond line <b>bold</b>"
)


def test_a_hostile_reason_reaches_notify_send_as_one_line_of_plain_text(notify_send: Path) -> None:
    notices = DesktopNotices("h", after_s=60)  # the real notifier: the fake notify-send first on PATH
    notices.observe(UP, None)
    notices.observe(FAILED, ConnectError(HOSTILE_REASON).to_dict())  # as the state file records it
    notices.close()  # flushes: the notifier has run when close returns
    (line,) = notify_send.read_text().splitlines()
    plain = 'Received disconnect from 127.0.0.1 port 22:2: a href="x"update/a img src=x 033[31mredx1b[0m C:temp  co'
    expected = (
        re.escape("--app-name=tunneld|tunneld: h is down|no connection for ") + r"\d+" + re.escape(f" s: {plain}|")
    )
    assert re.fullmatch(expected, line), line


def test_plain_text_keeps_the_first_line_and_quoted_text_short() -> None:
    peer = "SSH-2.0-" + "A" * 100
    text = plain_text(f'the peer sent "{peer}", not an SSH banner\nmore', 200)
    assert text == f'the peer sent "{peer[:59]}\u2026", not an SSH banner'
    assert plain_text("\n  \nsecond\r\nthird", 200) == "second"
    assert plain_text("first\\x0asecond", 200) == "first"  # a line break as a message shows it
    assert plain_text("x" * 300, 160) == "x" * 159 + "\u2026"


def test_a_changed_host_key_after_up_is_notified_before_the_supervisor_exits_every_time(
    tmp_path: Path, sshd: SshServer, echo: EchoServer, engine: str, notify_send: Path,
    foreground: list[ForegroundTunnel],
) -> None:  # fmt: skip
    port = free_port()
    config = write_config(tmp_path, sshd.client_config("keyed", [f"LocalForward {port} 127.0.0.1:{echo.port}"]))
    write_settings("notify_after_s = 60\n")  # a plain loss would wait a minute: only the fatal error notifies
    rounds = 5
    for done in range(rounds):
        sshd.write_known_hosts()  # trust the server's current key
        tunnel = start(foreground, "keyed", config, engine)
        tunnel.wait_state("up")
        sshd.stop()
        sshd.regenerate_host_key()
        sshd.start()
        assert tunnel.wait_exit(30) == EXIT_CONFIG, tunnel.stderr()
        # The process has exited: its notice must have been shown already (no waiting here).
        lines = notify_send.read_text().splitlines()
        assert len(lines) == done + 1, f"round {done + 1}: {lines}"
        assert lines[-1].startswith("--app-name=tunneld|tunneld: keyed is down|no connection for "), lines[-1]
        assert "the host key of 127.0.0.1 has CHANGED" in lines[-1], lines[-1]
