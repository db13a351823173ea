"""`tunneld status --watch`: redrawn in place on a terminal (a real pty), plain frames into a pipe."""

from __future__ import annotations

import os
import re
import select
import signal
import subprocess
import time
from pathlib import Path

from tests.harness import EchoServer, SshServer, free_port, scaled
from tests.helpers import run_cli, tunneld_cmd, write_config
from tunneld.cli.watch import ENTER, ERASE_BELOW, ERASE_LINE, HOME, LEAVE, ByteRates
from tunneld.state.status import HostReport

EXIT_INTERRUPTED = 130


def read_for(fd: int, seconds: float) -> bytes:
    """Read from `fd` for `seconds` (bounded), returning what arrived."""
    out = b""
    deadline = time.monotonic() + seconds
    while (left := deadline - time.monotonic()) > 0:
        ready, _, _ = select.select([fd], [], [], left)
        if ready:
            try:
                chunk = os.read(fd, 65536)
            except OSError:  # the pty's other end closed
                break
            if not chunk:
                break
            out += chunk
    return out


def normalised(frame: str) -> str:
    """A frame with what changes between redraws (the clock, uptimes) replaced by placeholders."""
    frame = re.sub(r"\d\d:\d\d:\d\d", "HH:MM:SS", frame)
    return re.sub(r"  \d+s  ", "  Ns  ", frame)


def test_watch_redraws_in_place_on_a_terminal(tmp_path: Path, sshd: SshServer, echo: EchoServer) -> None:
    port = free_port()
    config = write_config(tmp_path, sshd.client_config("watched", [f"LocalForward {port} 127.0.0.1:{echo.port}"]))
    assert run_cli("start", "watched", "-F", str(config)).returncode == 0
    main, secondary = os.openpty()
    proc = subprocess.Popen(
        tunneld_cmd("status", "--watch", "--interval", "0.5"),
        stdin=secondary, stdout=secondary, stderr=secondary, start_new_session=True,
        env={k: v for k, v in os.environ.items() if k != "NO_COLOR"},
    )  # fmt: skip
    os.close(secondary)
    try:
        output = read_for(main, scaled(3.0))
        proc.send_signal(signal.SIGINT)
        output += read_for(main, scaled(3.0))
        assert proc.wait(10) == EXIT_INTERRUPTED
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        os.close(main)
        run_cli("stop", "watched")
    text = output.decode().replace("\r\n", "\n")  # the pty turns \n into \r\n
    assert text.startswith(ENTER) and text.endswith(LEAVE), repr(text[:40] + text[-40:])
    assert "\x1b[2J" not in text  # never cleared, only overwritten: no flicker
    frames = text[len(ENTER) : -len(LEAVE)].split(HOME)[1:]
    assert len(frames) >= 2, repr(text)
    for frame in frames:
        lines = frame.split("\n")
        assert lines[-1] == ERASE_BELOW and all(line.endswith(ERASE_LINE) for line in lines[:-1]), repr(frame)
    first, second = (normalised(f) for f in frames[:2])
    assert first == second  # the same table, redrawn
    rows = [line.removesuffix(ERASE_LINE) for line in first.split("\n")[:-1]]
    assert rows[0] == "tunneld status  every 0.5 s  HH:MM:SS  (Ctrl-C ends)" and rows[1] == ""
    assert rows[2].startswith("HOST") and "FORWARDS" in rows[2]
    assert rows[3].startswith("\x1b[32mwatched  up  ") and rows[3].endswith("\x1b[0m"), repr(rows[3])  # up in green


def test_watch_into_a_pipe_prints_plain_frames_and_honours_no_color(tmp_path: Path) -> None:
    proc = subprocess.Popen(
        tunneld_cmd("status", "--watch", "--interval", "0.2"),
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=dict(os.environ, NO_COLOR="1"),
    )  # fmt: skip
    try:
        assert proc.stdout is not None
        output = read_for(proc.stdout.fileno(), scaled(2.0))
        proc.send_signal(signal.SIGINT)
        output += proc.communicate(timeout=10)[0]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    text = output.decode()
    assert "\x1b" not in text and text.count("tunneld status  every 0.2 s") >= 2, text
    assert "no tunnels: start one with `tunneld start HOST`\n\n" in text


def test_watch_and_json_do_not_mix() -> None:
    done = run_cli("status", "--watch", "--json")
    assert done.returncode == 2 and "--watch draws the table" in done.stderr


def test_byte_rates_come_from_two_frames() -> None:
    def report(bytes_in: int, bytes_out: int) -> HostReport:
        forward = {"forward": "localhost:5000 -> localhost:5000", "bytes_in": bytes_in, "bytes_out": bytes_out}
        return HostReport("h", "up", True, forwards=(forward,))

    rates = ByteRates()
    assert rates.update([report(0, 0)], now=10.0) == {}
    assert rates.update([report(4096, 1024)], now=12.0) == {("h", "localhost:5000 -> localhost:5000"): (2048, 512)}
    assert rates.update([report(0, 0)], now=13.0) == {}  # counters restarted (a new supervisor): no negative rate
