"""Unix stream sockets for the CI helpers: a connection to a socket that its owner may not
have created, or be listening on, yet."""

import socket
import time


def connect_when_listening(path: str, timeout: float, interval: float) -> socket.socket:
    """Connect to the unix stream socket at PATH, retrying every INTERVAL seconds while it
    does not exist or refuses, for up to TIMEOUT seconds (then the last error is raised)."""
    end = time.monotonic() + timeout
    while True:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            s.connect(path)
            return s
        except (FileNotFoundError, ConnectionRefusedError):
            s.close()
            if time.monotonic() > end:
                raise
            time.sleep(interval)
