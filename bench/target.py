"""The benchmark's target service, run as its own process: bulk up, bulk down and echo on one port.

Protocol: the client sends one line, then
  `UP n`   the client sends n bytes; the server answers b"K" once it has them all
  `DOWN n` the server sends n bytes and closes
  `ECHO`   the server echoes everything until the client closes
"""

from __future__ import annotations

import socket
import socketserver
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.workload import drain, send_zeros


class Handler(socketserver.BaseRequestHandler):
    def handle(self) -> None:
        sock: socket.socket = self.request
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        line = b""
        while not line.endswith(b"\n"):
            byte = sock.recv(1)
            if not byte:
                return
            line += byte
        verb, _, arg = line.decode().strip().partition(" ")
        try:
            if verb == "UP":
                self.sink(sock, int(arg))
            elif verb == "DOWN":
                self.source(sock, int(arg))
            elif verb == "ECHO":
                self.echo(sock)
        except OSError:
            return

    @staticmethod
    def sink(sock: socket.socket, size: int) -> None:
        drain(sock, size)
        sock.sendall(b"K")

    @staticmethod
    def source(sock: socket.socket, size: int) -> None:
        send_zeros(sock, size)
        sock.shutdown(socket.SHUT_WR)

    @staticmethod
    def echo(sock: socket.socket) -> None:
        while True:
            data = sock.recv(65536)
            if not data:
                return
            sock.sendall(data)


class Server(socketserver.ThreadingTCPServer):
    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 4096


def main() -> None:
    server = Server(("127.0.0.1", 0), Handler)
    print(server.server_address[1], flush=True)
    server.serve_forever()


if __name__ == "__main__":
    main()
