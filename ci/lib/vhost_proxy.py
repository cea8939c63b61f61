#!/usr/bin/env python3
"""A vhost-user proxy that cuts one of QEMU's connections inside its handshake.

It listens on LISTEN for QEMU (`-chardev socket,path=LISTEN,reconnect=1`) and, for each
connection QEMU makes, connects to the backend at BACKEND and forwards vhost-user messages both
ways, each with the descriptors it carries (SCM_RIGHTS: guest memory, eventfds, the inflight
region, the backend request channel). Connection number CUT (counted from 1) is different:
QEMU's first AFTER messages pass (with the backend's replies), and when QEMU's next message
arrives the proxy closes both sockets without forwarding it, as a backend killed at that point
of the handshake would. Every other connection passes whole; one closed by either side is
closed on the other.

Events go to stdout, one line each, flushed: `accept N`, `N qemu REQ` for each request QEMU
sends on connection N, `N cut REQ after AFTER`, `N closed by qemu|backend|proxy`, and
`N no backend: ERROR` when the backend cannot be reached. REQ is the vhost-user request
number (18 is SET_VRING_ENABLE, QEMU's last step of starting the device).

Usage: vhost_proxy.py LISTEN BACKEND CUT AFTER
"""

import os
import socket
import struct
import sys
import threading

from unix_socket import connect_when_listening

HEADER = struct.Struct("<III")  # request, flags, size
MAX_FDS = 32
MAX_PAYLOAD = 1 << 20
BACKEND_CONNECT_SECONDS = 10.0

out_lock = threading.Lock()


def event(line: str) -> None:
    with out_lock:
        sys.stdout.write(line + "\n")
        sys.stdout.flush()


class Closed(Exception):
    """The peer closed its socket (or it failed)."""


def recv_exact(sock: socket.socket, n: int) -> bytes:
    buf = b""
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            raise Closed()
        buf += chunk
    return buf


def recv_message(sock: socket.socket):
    """One message: (header bytes, payload bytes, descriptors)."""
    data, fds, flags, _ = socket.recv_fds(sock, HEADER.size, MAX_FDS)
    if not data:
        raise Closed()
    if flags & socket.MSG_CTRUNC:
        for fd in fds:
            os.close(fd)
        raise Closed()
    header = data + recv_exact(sock, HEADER.size - len(data))
    _, _, size = HEADER.unpack(header)
    if size > MAX_PAYLOAD:
        raise Closed()
    payload = recv_exact(sock, size) if size else b""
    return header, payload, fds


def send_message(sock: socket.socket, header: bytes, payload: bytes, fds) -> None:
    msg = header + payload
    try:
        if fds:
            sent = socket.send_fds(sock, [msg], fds)
            if sent < len(msg):
                sock.sendall(msg[sent:])
        else:
            sock.sendall(msg)
    finally:
        for fd in fds:
            os.close(fd)


def connect_backend(path: str) -> socket.socket:
    """Connect to the backend, waiting a little for a restarted one to listen."""
    return connect_when_listening(path, BACKEND_CONNECT_SECONDS, 0.02)


class Connection:
    def __init__(self, number: int, qemu: socket.socket, backend: socket.socket, cut_after):
        self.number = number
        self.qemu = qemu
        self.backend = backend
        self.cut_after = cut_after
        self.closed_lock = threading.Lock()
        self.closed = False

    def close(self, by: str) -> None:
        with self.closed_lock:
            if self.closed:
                return
            self.closed = True
        event(f"{self.number} closed by {by}")
        for s in (self.qemu, self.backend):
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def from_qemu(self) -> None:
        sent = 0
        try:
            while True:
                header, payload, fds = recv_message(self.qemu)
                request = HEADER.unpack(header)[0]
                if self.cut_after is not None and sent >= self.cut_after:
                    for fd in fds:
                        os.close(fd)
                    event(f"{self.number} cut {request} after {sent}")
                    self.close("proxy")
                    return
                event(f"{self.number} qemu {request}")
                send_message(self.backend, header, payload, fds)
                sent += 1
        except (Closed, OSError):
            self.close("qemu")

    def from_backend(self) -> None:
        try:
            while True:
                header, payload, fds = recv_message(self.backend)
                send_message(self.qemu, header, payload, fds)
        except (Closed, OSError):
            self.close("backend")

    def run(self) -> None:
        threads = [
            threading.Thread(target=self.from_qemu, daemon=True),
            threading.Thread(target=self.from_backend, daemon=True),
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        self.qemu.close()
        self.backend.close()


def main() -> int:
    if len(sys.argv) != 5:
        print(__doc__.strip().splitlines()[-1], file=sys.stderr)
        return 2
    listen_path, backend_path = sys.argv[1], sys.argv[2]
    cut, after = int(sys.argv[3]), int(sys.argv[4])
    try:
        os.unlink(listen_path)
    except FileNotFoundError:
        pass
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(listen_path)
    server.listen(1)
    number = 0
    while True:
        qemu, _ = server.accept()
        number += 1
        event(f"accept {number}")
        try:
            backend = connect_backend(backend_path)
        except OSError as e:
            event(f"{number} no backend: {e}")
            qemu.close()
            continue
        conn = Connection(number, qemu, backend, after if number == cut else None)
        # One connection at a time, as a vhost-user backend serves them.
        conn.run()


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        sys.exit(0)
