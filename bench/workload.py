"""Client side of each measurement: bulk up/down, round trips, new connections, concurrency."""

from __future__ import annotations

import asyncio
import socket
import statistics
import time

CHUNK = 1 << 20
ZEROS = bytes(CHUNK)
IO_TIMEOUT_S = 60.0


def _connect(port: int) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=IO_TIMEOUT_S)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def bulk_up(port: int, size: int) -> float:
    """Send `size` bytes through the forward; return MB/s (10^6 bytes) until the target confirmed all of it."""
    with _connect(port) as sock:
        began = time.perf_counter()
        sock.sendall(f"UP {size}\n".encode())
        left = size
        while left > 0:
            part = ZEROS if left >= CHUNK else ZEROS[:left]
            sock.sendall(part)
            left -= len(part)
        if sock.recv(1) != b"K":
            raise OSError("upload not confirmed")
        return size / (time.perf_counter() - began) / 1e6


def bulk_down(port: int, size: int) -> float:
    """Receive `size` bytes through the forward; return MB/s."""
    with _connect(port) as sock:
        buffer = bytearray(CHUNK)
        view = memoryview(buffer)
        began = time.perf_counter()
        sock.sendall(f"DOWN {size}\n".encode())
        left = size
        while left > 0:
            got = sock.recv_into(view, min(CHUNK, left))
            if not got:
                raise OSError(f"download ended {left} bytes short")
            left -= got
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
