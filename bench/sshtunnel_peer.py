"""sshtunnel's SSHTunnelForwarder as the established Python peer, in its own process (benchmark only).

Usage: sshtunnel_peer.py SSH_PORT USER KEY TARGET_PORT LOCAL_PORT. Prints `ready`, runs until stdin closes.
"""

from __future__ import annotations

import sys

from sshtunnel import SSHTunnelForwarder


def main() -> int:
    ssh_port, user, key, target_port, local_port = sys.argv[1:6]
    forwarder = SSHTunnelForwarder(
        ("127.0.0.1", int(ssh_port)),
        ssh_username=user,
        ssh_pkey=key,
        remote_bind_address=("127.0.0.1", int(target_port)),
        local_bind_address=("127.0.0.1", int(local_port)),
        allow_agent=False,
        host_pkey_directories=[],
    )
    forwarder.start()
    print("ready", flush=True)
    sys.stdin.read()
    forwarder.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
