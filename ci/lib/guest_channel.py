#!/usr/bin/env python3
"""The host end of a test guest's control channel (its second serial port).

QEMU serves the port as a unix socket (`-chardev socket,...,server=on`). This program connects
to it, appends every line the guest sends to OUT (one write and flush per line, so a shell
script can follow the file while the guest runs), and sends the guest the line `STOP` when it
receives SIGUSR1. It exits 0 when QEMU closes the socket, 1 when it cannot connect.

Usage: guest_channel.py SOCKET OUT [CONNECT_TIMEOUT_SECONDS]
"""

import os
import selectors
import signal
import sys

from unix_socket import connect_when_listening


def main() -> int:
    if len(sys.argv) not in (3, 4):
        print(__doc__.strip().splitlines()[-1], file=sys.stderr)
        return 2
    path, out_path = sys.argv[1], sys.argv[2]
    timeout = float(sys.argv[3]) if len(sys.argv) == 4 else 60.0

    # A signal only sets a flag and wakes the selector; the main loop sends.
    wake_r, wake_w = os.pipe()
    os.set_blocking(wake_w, False)
    stop_requested = False

    def on_usr1(_signum, _frame):
        nonlocal stop_requested
        stop_requested = True
        try:
            os.write(wake_w, b"x")
        except BlockingIOError:
            pass

    signal.signal(signal.SIGUSR1, on_usr1)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))

    try:
        sock = connect_when_listening(path, timeout, 0.05)
    except OSError as e:
        print(f"guest_channel: cannot connect to {path}: {e}", file=sys.stderr)
        return 1

    sel = selectors.DefaultSelector()
    sel.register(sock, selectors.EVENT_READ)
    sel.register(wake_r, selectors.EVENT_READ)
    sent_stop = False
    pending = b""
    with open(out_path, "ab", buffering=0) as out:
        while True:
            if stop_requested and not sent_stop:
                try:
                    sock.sendall(b"STOP\n")
                except OSError:
                    return 0
                sent_stop = True
            for key, _ in sel.select():
                if key.fileobj == wake_r:
                    os.read(wake_r, 64)
                    continue
                try:
                    data = sock.recv(65536)
                except ConnectionResetError:
                    data = b""
                if not data:
                    if pending:
                        out.write(pending + b"\n")
                    return 0
                pending += data
                *lines, pending = pending.split(b"\n")
                for line in lines:
                    out.write(line.rstrip(b"\r") + b"\n")


if __name__ == "__main__":
    sys.exit(main())
