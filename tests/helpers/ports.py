"""A free TCP port for a launch: concurrent test runs on one machine must not meet on a fixed port."""

import socket


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]
