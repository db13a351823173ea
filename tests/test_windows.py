"""Receive-window growth for long fat paths: the rule as a value, the forwarder's decision on it, and a real
download through a slow path."""

from __future__ import annotations

import hashlib
import selectors
import socket
import time
from pathlib import Path

import paramiko

from tests.harness import DelayRelay, DownloadServer, SshServer, free_port, wait_for
from tests.helpers import ForegroundTunnel, read_state, start, write_config
from tunneld.engines.pump import Counters, Pair, Pump
from tunneld.engines.windows import MAX_WINDOW_BYTES, START_WINDOW_BYTES, WindowGrowth

MIB = 1024 * 1024
RTT_S = 0.04


def test_a_window_the_sender_fills_within_a_round_trip_doubles() -> None:
    growth = WindowGrowth()
    # 2 MiB arrived in one 40 ms round trip: the window is what limits the transfer.
    assert growth.bytes_to_add(START_WINDOW_BYTES, 2 * MIB, RTT_S, RTT_S, 64 * MIB, True) == START_WINDOW_BYTES


def test_a_window_filled_in_bursts_still_grows() -> None:
    growth = WindowGrowth()  # 60% of the window per round trip: what a window-limited transfer measures
    assert growth.bytes_to_add(8 * MIB, 5 * MIB, RTT_S, RTT_S, 64 * MIB, True) == 8 * MIB


def test_a_window_the_path_does_not_fill_stays() -> None:
    growth = WindowGrowth()
    assert growth.bytes_to_add(START_WINDOW_BYTES, MIB // 2, RTT_S, RTT_S, 64 * MIB, True) == 0


def test_growth_stops_for_a_reader_that_falls_behind_at_the_cap_and_at_the_budget() -> None:
    growth = WindowGrowth()
    assert growth.bytes_to_add(START_WINDOW_BYTES, 4 * MIB, RTT_S, RTT_S, 64 * MIB, reader_keeps_up=False) == 0
    assert growth.bytes_to_add(MAX_WINDOW_BYTES, 64 * MIB, RTT_S, RTT_S, 64 * MIB, True) == 0
    assert growth.bytes_to_add(24 * MIB, 48 * MIB, RTT_S, RTT_S, 64 * MIB, True) == MAX_WINDOW_BYTES - 24 * MIB
    assert growth.bytes_to_add(START_WINDOW_BYTES, 4 * MIB, RTT_S, RTT_S, MIB, True) == MIB
    assert growth.bytes_to_add(START_WINDOW_BYTES, 4 * MIB, RTT_S, RTT_S, 0, True) == 0


def test_without_a_measured_round_trip_nothing_grows() -> None:
    assert WindowGrowth().bytes_to_add(START_WINDOW_BYTES, 4 * MIB, 0.05, 0.0, 64 * MIB, True) == 0


def grants_after_handing_on(chunk_bytes: int) -> tuple[list[int], int]:
    """The forwarder's growth decision with real inputs: the pump hands a chunk the channel sent to the local client
    (whose socket takes what it has room for, nothing more: the client reads nothing), at the end of a sample in
    which the sender filled the window many times over in each round trip. Return (windows granted, bytes still
    queued here for the client)."""
    grants: list[int] = []
    selector = selectors.DefaultSelector()
    pump = Pump(selector, "grow", widen=lambda _channel, extra: grants.append(extra))
    pump.rtt_s = RTT_S
    ours, client = socket.socketpair()
    try:
        ours.setblocking(False)
        pair = Pair(ours, paramiko.Channel(0), Counters(), window=START_WINDOW_BYTES)
        pair.sample_at, pair.sample_bytes = time.monotonic() - 2 * RTT_S, 64 * MIB  # a sample 2 round trips long
        pair.to_local += bytes(chunk_bytes)
        pump._flush_to_local(pair)
        pump._maybe_grow(pair, chunk_bytes)
        return grants, len(pair.to_local)
    finally:
        client.close()
        ours.close()
        selector.close()


def test_the_forwarder_widens_the_window_of_a_client_that_takes_all_it_is_sent() -> None:
    grants, queued = grants_after_handing_on(32 * 1024)  # the client's socket has room for the whole chunk
    assert (grants, queued) == ([START_WINDOW_BYTES], 0)


def test_the_forwarder_never_widens_the_window_of_a_client_that_falls_behind() -> None:
    """More window for a slow reader would only pile more of the download up in tunneld's memory."""
    grants, queued = grants_after_handing_on(4 * MIB)  # more than the client's socket holds: the rest waits here
    assert grants == [] and queued > 0, (grants, queued)


def test_a_large_download_over_a_slow_path_arrives_intact(
    tmp_path: Path, sshd: SshServer, foreground: list[ForegroundTunnel]
) -> None:
    """48 MiB through sshd behind a 40 ms relay: windows grow mid-transfer, and not one byte is lost or moved."""
    target = DownloadServer(48 * MIB)
    relay = DelayRelay((sshd.host, sshd.port), 20)
    try:
        port = free_port()
        text = sshd.client_config("far", [f"LocalForward {port} 127.0.0.1:{target.port}"])
        text = text.replace("HostName 127.0.0.1", "HostName 127.0.0.1").replace(
            f"Port {sshd.port}", f"Port {relay.port}"
        )
        (tmp_path / "known_far").write_text(f"[127.0.0.1]:{relay.port} {sshd.host_public_key()}\n")
        config = write_config(tmp_path, text.replace(str(sshd.known_hosts), str(tmp_path / "known_far")))
        tunnel = start(foreground, "far", config, "paramiko")
        tunnel.wait_state("up", "degraded")
        digest = hashlib.sha256()
        received = 0
        with socket.create_connection(("127.0.0.1", port), timeout=60) as sock:
            while chunk := sock.recv(1 << 20):
                digest.update(chunk)
                received += len(chunk)
        assert received == len(target.payload)
        assert digest.digest() == hashlib.sha256(target.payload).digest()
        # Byte counts reach the state file at the next heartbeat (every 5 s).
        wait_for(lambda: read_state("far")["forwards"][0]["bytes_in"] == received, 10, "the byte count")  # type: ignore[index]
    finally:
        relay.close()
        target.close()
