"""`tunneld status --watch`: the status table redrawn in place until Ctrl-C.

On a terminal each frame is drawn on the alternate screen from its top-left corner, every line
followed by erase-to-end-of-line and the frame by erase-below: nothing scrolls and nothing is
cleared first, so nothing flickers. Elsewhere (a pipe, a file) each frame is printed plainly, followed
by a blank line. Colour marks each host's state on a terminal unless NO_COLOR is set.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Sequence
from typing import TextIO

from tunneld.cli.render import STATUS_HEADER, size, status_row, table, terminal_width
from tunneld.state.status import HostReport
from tunneld.states import BACKOFF, CONNECTING, DEGRADED, FAILED, LOST, NEEDS_AUTH, STARTING, UP

ENTER = "\x1b[?1049h\x1b[?25l"  # alternate screen, cursor hidden
LEAVE = "\x1b[?25h\x1b[?1049l"
HOME, ERASE_LINE, ERASE_BELOW = "\x1b[H", "\x1b[K", "\x1b[J"
RESET = "\x1b[0m"
COLOURS = {UP: "\x1b[32m", DEGRADED: "\x1b[33m", BACKOFF: "\x1b[33m", CONNECTING: "\x1b[33m",
           STARTING: "\x1b[33m", LOST: "\x1b[31m", FAILED: "\x1b[31m",
           NEEDS_AUTH: "\x1b[35m"}  # fmt: skip

Rates = dict[tuple[str, str], tuple[float, float]]


class ByteRates:
    """Bytes per second of each forward between two frames (the paramiko engine counts bytes)."""

    def __init__(self) -> None:
        self._last: dict[tuple[str, str], tuple[float, int, int]] = {}

    def update(self, reports: Sequence[HostReport], now: float) -> Rates:
        """Take one frame's reports; return the rates since the previous frame."""
        rates: Rates = {}
        seen: dict[tuple[str, str], tuple[float, int, int]] = {}
        for report in reports:
            for forward in report.forwards:
                bytes_in, bytes_out = forward.get("bytes_in"), forward.get("bytes_out")
                if not isinstance(bytes_in, int) or not isinstance(bytes_out, int):
                    continue
                key = (report.host, str(forward.get("forward")))
                seen[key] = (now, bytes_in, bytes_out)
                before = self._last.get(key)
                if before is not None and now > before[0] and bytes_in >= before[1] and bytes_out >= before[2]:
                    elapsed = now - before[0]
                    rates[key] = ((bytes_in - before[1]) / elapsed, (bytes_out - before[2]) / elapsed)
        self._last = seen
        return rates


def frame_lines(
    reports: Sequence[HostReport], rates: Rates, interval: float, colour: bool, width: int | None = None
) -> list[str]:
    """Return one frame: a title line, then the status table with byte rates where they are known (fitted to
    `width`, when given)."""
    rows = []
    for report in reports:
        row = status_row(report)
        shown = [f"{size(int(rates[k][0]))}/s in, {size(int(rates[k][1]))}/s out"
                 for k in ((report.host, str(f.get("forward"))) for f in report.forwards) if k in rates]  # fmt: skip
        if shown:
            row[STATUS_HEADER.index("FORWARDS")] += f" ({'; '.join(shown)})"
        rows.append(row)
    title = f"tunneld status  every {interval:g} s  {time.strftime('%H:%M:%S')}  (Ctrl-C ends)"
    if not reports:
        return [title, "", "no tunnels: start one with `tunneld start HOST`"]
    lines = table(STATUS_HEADER, rows, width)
    if colour:
        lines[1:] = [COLOURS.get(r.state, "") + line + (RESET if r.state in COLOURS else "")
                     for r, line in zip(reports, lines[1:], strict=True)]  # fmt: skip
    return [title, "", *lines]


def draw_until_interrupted(
    reports: Callable[[], list[HostReport]],
    interval: float,
    out: TextIO,
    frames: int | None = None,
    sleep: Callable[[float], None] = time.sleep,
) -> None:
    """Draw frames every `interval` seconds until interrupted (or `frames` frames have been drawn)."""
    terminal = out.isatty()
    colour = terminal and not os.environ.get("NO_COLOR")
    rates = ByteRates()
    drawn = 0
    if terminal:
        out.write(ENTER)
    try:
        while frames is None or drawn < frames:
            current = reports()
            width = terminal_width(out) if terminal else None  # asked every frame: the window may be resized
            # One column short of the edge: a line that fills the last column leaves the cursor there, and the
            # erase-to-end-of-line after it would erase that column's character.
            fitted = width - 1 if width else None
            lines = frame_lines(current, rates.update(current, time.monotonic()), interval, colour, fitted)
            if terminal:
                out.write(HOME + "".join(line + ERASE_LINE + "\n" for line in lines) + ERASE_BELOW)
            else:
                out.write("\n".join(lines) + "\n\n")
            out.flush()
            drawn += 1
            if frames is None or drawn < frames:
                sleep(interval)
    finally:
        if terminal:
            out.write(LEAVE)
            out.flush()
