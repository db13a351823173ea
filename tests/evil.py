"""Hostile peers for tests/test_hostile.py: an SSH server (paramiko's server side) that tries to reach back
into the client, and a TCP server that greets with terminal escapes. Both on loopback, stopped by close()."""

from __future__ import annotations

import contextlib
import socket
import struct
import threading
from pathlib import Path

import paramiko
from paramiko.common import (
    AUTH_FAILED,
    AUTH_SUCCESSFUL,
    OPEN_FAILED_ADMINISTRATIVELY_PROHIBITED,
    OPEN_FAILED_CONNECT_FAILED,
)

from tests.harness import keygen

AGENTC_REQUEST_IDENTITIES = 11
AGENT_IDENTITIES_ANSWER = 12
OSC52 = "\x1b]52;c;ZXZpbA==\x07"  # would write "evil" into the terminal's clipboard
# ssh's own words, as a device on the path (or a server before its host key is verified) can replay them.
WARNING_BLOCK = (
    b"@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@\r\n"
    b"@    WARNING: REMOTE HOST IDENTIFICATION HAS CHANGED!     @\r\n"
    b"@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@\r\n"
    b"Host key verification failed.\r\n"
)
# Lines a relay before the host key forges into ssh's stderr through its DEBUG and DISCONNECT messages.
FORGED = (
    b"x\r\ndebug1: Server host key: ssh-ed25519 SHA256:forged\r\n"
    b"@    WARNING: REMOTE HOST IDENTIFICATION HAS CHANGED!     @\r\nHost key verification failed.\r\n"
    b'debug1: SSH2_MSG_NEWKEYS sent\r\nAuthenticated to 127.0.0.1 ([127.0.0.1]:22) using "publickey".\r\n'
)


class _Interface(paramiko.ServerInterface):
    def __init__(self, client_key: bytes, banner: str) -> None:
        self.client_key = client_key
        self.banner = banner

    def get_allowed_auths(self, username: str) -> str:
        return "publickey"

    def check_auth_publickey(self, username: str, key: paramiko.PKey) -> int:
        return AUTH_SUCCESSFUL if key.asbytes() == self.client_key else AUTH_FAILED

    def check_channel_request(self, kind: str, chanid: int) -> int:
        return OPEN_FAILED_ADMINISTRATIVELY_PROHIBITED

    def check_channel_direct_tcpip_request(self, chanid: int, origin: object, destination: object) -> int:
        return OPEN_FAILED_CONNECT_FAILED

    def get_banner(self) -> tuple[str, str]:
        return self.banner, "en-US"


class AgentSnoopingServer:
    """After login, opens an `auth-agent@openssh.com` channel to the client and asks for its keys.

    `outcome` ends as "refused" (the client said no), "keys: N" (the agent answered), or an error.
    """

    def __init__(self, workdir: Path, banner: str = "") -> None:
        workdir.mkdir(parents=True, exist_ok=True)
        self.host_key_path = keygen(workdir / "evil_host_key", "evil-host")
        self.client_key = keygen(workdir / "id_evil", "evil-client")
        public = (workdir / "id_evil.pub").read_text().split()
        self._client_blob = paramiko.Ed25519Key.from_private_key_file(str(self.client_key)).asbytes()
        self.host_key = paramiko.Ed25519Key.from_private_key_file(str(self.host_key_path))
        self.banner = banner
        self.outcome: str | None = None
        self.done = threading.Event()
        self._listener = socket.socket()
        self._listener.bind(("127.0.0.1", 0))
        self._listener.listen(8)
        self.port = int(self._listener.getsockname()[1])
        self.known_hosts = workdir / "evil_known_hosts"
        self.known_hosts.write_text(
            f"[127.0.0.1]:{self.port} {self.host_key.get_name()} {self.host_key.get_base64()}\n"
        )
        self._transports: list[paramiko.Transport] = []
        self._closed = threading.Event()
        assert public[0] == "ssh-ed25519"
        threading.Thread(target=self._serve, daemon=True).start()

    def client_config(self, alias: str, forwards: list[str], extra: list[str]) -> str:
        """Return a Host block reaching this server with its client key."""
        lines = [
            f"Host {alias}",
            "  HostName 127.0.0.1",
            f"  Port {self.port}",
            f"  IdentityFile {self.client_key}",
            "  IdentitiesOnly yes",
            f"  UserKnownHostsFile {self.known_hosts}",
            "  GlobalKnownHostsFile /dev/null",
            "  StrictHostKeyChecking yes",
            *(f"  {line}" for line in extra),
            *(f"  {line}" for line in forwards),
        ]
        return "\n".join(lines) + "\n"

    def _serve(self) -> None:
        while not self._closed.is_set():
            try:
                sock, _ = self._listener.accept()
            except OSError:
                return
            threading.Thread(target=self._session, args=(sock,), daemon=True).start()

    def _session(self, sock: socket.socket) -> None:
        transport = paramiko.Transport(sock)
        self._transports.append(transport)
        transport.add_server_key(self.host_key)
        try:
            transport.start_server(server=_Interface(self._client_blob, self.banner))
            for _ in range(100):  # wait (bounded) for the client to log in
                if transport.is_authenticated() or not transport.is_active():
                    break
                self._closed.wait(0.05)
            if transport.is_authenticated() and self.outcome is None:
                self.outcome = self._snoop(transport)
                self.done.set()
        except (paramiko.SSHException, OSError, EOFError):
            return

    def _snoop(self, transport: paramiko.Transport) -> str:
        try:
            channel = transport.open_channel("auth-agent@openssh.com", timeout=5)
        except paramiko.ChannelException:
            return "refused"
        except (paramiko.SSHException, OSError, EOFError) as exc:
            return f"error: {exc}"
        channel.settimeout(5)
        try:
            channel.sendall(struct.pack(">IB", 1, AGENTC_REQUEST_IDENTITIES))
            header = channel.recv(5)
            if len(header) < 5 or header[4] != AGENT_IDENTITIES_ANSWER:
                return "no answer"
            return f"keys: {struct.unpack('>I', channel.recv(4))[0]}"
        except (OSError, struct.error) as exc:
            return f"error: {exc}"
        finally:
            channel.close()

    def close(self) -> None:
        """Stop listening and end every session."""
        self._closed.set()
        self._listener.close()
        for transport in self._transports:
            with contextlib.suppress(Exception):
                transport.close()


class EscapeGreeter:
    """A TCP server whose greeting line is an SSH version string carrying terminal escapes."""

    def __init__(self) -> None:
        self._listener = socket.socket()
        self._listener.bind(("127.0.0.1", 0))
        self._listener.listen(8)
        self.port = int(self._listener.getsockname()[1])
        self._closed = threading.Event()
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while not self._closed.is_set():
            try:
                sock, _ = self._listener.accept()
            except OSError:
                return
            with sock, contextlib.suppress(OSError):
                sock.sendall(f"SSH-2.0-evil{OSC52}\x1b[2J\r\n".encode())
                sock.recv(1024)

    def close(self) -> None:
        """Stop listening."""
        self._closed.set()
        self._listener.close()


def ssh_packet(payload: bytes) -> bytes:
    """Frame `payload` as an unencrypted SSH binary packet (what a server sends before key exchange)."""
    padding = 8 - (len(payload) + 5) % 8
    padding += 8 if padding < 4 else 0
    return struct.pack(">IB", len(payload) + 1 + padding, padding) + payload + b"\0" * padding


def _ssh_string(data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + data


def debug_and_disconnect(debug: bytes, reason: bytes) -> bytes:
    """An SSH banner, then SSH_MSG_DEBUG(`debug`) and SSH_MSG_DISCONNECT(`reason`): text ssh logs verbatim."""
    return (
        b"SSH-2.0-OpenSSH_9.2\r\n"
        + ssh_packet(b"\x04\x01" + _ssh_string(debug) + _ssh_string(b""))
        + ssh_packet(b"\x01" + struct.pack(">I", 2) + _ssh_string(reason) + _ssh_string(b""))
    )


class ScriptedPeer:
    """A TCP server on loopback that answers every connection with chosen bytes, then closes it (reset=True:
    with a TCP reset). It plays a device on the network path, or a server's defences closing at once."""

    def __init__(self, payload: bytes = b"", reset: bool = False, read_first: bool = False) -> None:
        self.payload = payload
        self.reset = reset
        self.read_first = read_first  # wait for the client's banner before answering
        self._listener = socket.create_server(("127.0.0.1", 0))
        self._listener.settimeout(0.2)  # accept() wakes up to see close()
        self.port = int(self._listener.getsockname()[1])
        self._closed = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while not self._closed.is_set():
            try:
                sock, _ = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            with sock, contextlib.suppress(OSError):
                sock.settimeout(5)
                if self.read_first:
                    sock.recv(1024)
                sock.sendall(self.payload)
                if self.reset:
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                else:
                    sock.shutdown(socket.SHUT_WR)
                    while sock.recv(65536):  # until the client closes: unread bytes would turn our close into a reset
                        pass

    def close(self) -> None:
        """Stop listening (the accept loop notices within its timeout)."""
        self._closed.set()
        self._thread.join(5)
        self._listener.close()
