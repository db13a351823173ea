"""Client side of each measurement: bulk up/down, round trips, new connections, concurrency."""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import os
import select
import socket
import statistics
import tempfile
import time

CHUNK = 1 << 20
ZEROS = bytes(CHUNK)
IO_TIMEOUT_S = 60.0
ZERO_FILE_BYTES = 64 << 20
F_SETPIPE_SZ = 1031  # Linux fcntl


def zero_file() -> str:
    """A sparse file of zeros to sendfile from (made once per machine, in the temp directory)."""
    path = os.path.join(tempfile.gettempdir(), "tunneld-bench-zeros")
    if not os.path.exists(path) or os.path.getsize(path) != ZERO_FILE_BYTES:
        with open(path, "wb") as handle:
            handle.truncate(ZERO_FILE_BYTES)
    return path


def _connect(port: int) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=IO_TIMEOUT_S)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def send_zeros(sock: socket.socket, size: int) -> None:
    """Send `size` zero bytes with sendfile from /dev/zero-like pages: the endpoint costs almost no CPU,
    so the forwarder, not Python, is what the numbers measure."""
    with open(zero_file(), "rb") as source:
        left = size
        while left > 0:
            sent = sock.sendfile(source, 0, min(left, ZERO_FILE_BYTES))
            if not sent:
                raise OSError("peer closed during sendfile")
            left -= sent


def drain(sock: socket.socket, size: int) -> None:
    """Receive and discard `size` bytes: splice into /dev/null where Linux offers it, else recv_into."""
    if not hasattr(os, "splice"):
        view = memoryview(bytearray(CHUNK))
        left = size
        while left > 0:
            got = sock.recv_into(view, min(CHUNK, left))
            if not got:
                raise OSError(f"stream ended {left} bytes short")
            left -= got
        return
    read_end, write_end = os.pipe()
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        with contextlib.suppress(OSError):
            fcntl.fcntl(write_end, F_SETPIPE_SZ, CHUNK)
        left = size
        while left > 0:
            try:
                got = os.splice(sock.fileno(), write_end, min(CHUNK, left))
            except BlockingIOError:  # sockets with a timeout are non-blocking underneath
                if not select.select([sock], [], [], IO_TIMEOUT_S)[0]:
                    raise TimeoutError(f"no data for {IO_TIMEOUT_S:.0f} s") from None
                continue
            if not got:
                raise OSError(f"stream ended {left} bytes short")
            pending = got
            while pending:
                pending -= os.splice(read_end, devnull, pending)
            left -= got
    finally:
        for fd in (read_end, write_end, devnull):
            os.close(fd)


def bulk_up(port: int, size: int) -> float:
    """Send `size` bytes through the forward; return MB/s (10^6 bytes) until the target confirmed all of it."""
    with _connect(port) as sock:
        began = time.perf_counter()
        sock.sendall(f"UP {size}\n".encode())
        send_zeros(sock, size)
        if sock.recv(1) != b"K":
            raise OSError("upload not confirmed")
        return size / (time.perf_counter() - began) / 1e6


def bulk_down(port: int, size: int) -> float:
    """Receive `size` bytes through the forward; return MB/s."""
    with _connect(port) as sock:
        began = time.perf_counter()
        sock.sendall(f"DOWN {size}\n".encode())
        drain(sock, size)
        return size / (time.perf_counter() - began) / 1e6


def _exact(sock: socket.socket, size: int) -> bytes:
    data = b""
    while len(data) < size:
        chunk = sock.recv(size - len(data))
        if not chunk:
            raise OSError("connection closed")
        data += chunk
    return data


def round_trips(port: int, count: int, size: int = 64) -> list[float]:
    """`count` round trips of `size` bytes on one connection; return each latency in ms."""
    payload = b"x" * size
    out = []
    with _connect(port) as sock:
        sock.sendall(b"ECHO\n")
        for _ in range(count):
            began = time.perf_counter()
            sock.sendall(payload)
            _exact(sock, size)
            out.append((time.perf_counter() - began) * 1e3)
    return out


def new_connections(port: int, count: int, size: int = 64) -> list[float]:
    """`count` times: connect, one round trip, close; return each latency in ms."""
    payload = b"x" * size
    out = []
    for _ in range(count):
        began = time.perf_counter()
        with _connect(port) as sock:
            sock.sendall(b"ECHO\n" + payload)
            _exact(sock, size)
        out.append((time.perf_counter() - began) * 1e3)
    return out


async def _concurrent(port: int, count: int, size: int, timeout: float) -> int:
    async def one() -> bool:
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(f"DOWN {size}\n".encode())
            await writer.drain()
            await reader.readexactly(size)
            writer.close()
        except (OSError, asyncio.IncompleteReadError):
            return False
        return True

    tasks = [asyncio.ensure_future(one()) for _ in range(count)]
    done, pending = await asyncio.wait(tasks, timeout=timeout)
    for task in pending:
        task.cancel()
    return sum(1 for t in done if not t.cancelled() and t.result())


def concurrent(port: int, count: int, size: int, timeout: float = 120.0) -> tuple[float, int]:
    """`count` connections at once, each downloading `size` bytes; return (wall seconds, failures)."""
    began = time.perf_counter()
    ok = asyncio.run(_concurrent(port, count, size, timeout))
    return time.perf_counter() - began, count - ok


def summary(values: list[float]) -> dict[str, float]:
    """Median, p99, min and max of a sample."""
    ordered = sorted(values)
    p99 = ordered[min(len(ordered) - 1, round(0.99 * (len(ordered) - 1)))]
    return {"p50": statistics.median(ordered), "p99": p99, "min": ordered[0], "max": ordered[-1]}


def echo_once(port: int, timeout: float) -> bool:
    """One connection and round trip through the forward within `timeout` (recovery probe)."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
            sock.settimeout(timeout)
            sock.sendall(b"ECHO\nping")
            return _exact(sock, 4) == b"ping"
    except OSError:
        return False
