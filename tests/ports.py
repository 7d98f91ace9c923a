"""Ports for the servers tests start: below the kernel's ephemeral range.

Linux hands out 32768-60999 to client sockets (and to bind(0)), so a server port in that range
can be taken at any moment by some client's ephemeral end; servers listen below it instead.
"""

from __future__ import annotations

import random
import socket

SERVER_PORTS = range(20000, 32768)


def free_port(host: str = "127.0.0.1") -> int:
    """A currently free TCP port on ``host`` below the ephemeral range.

    Callers retry on the small race between this check and their server's bind.
    """
    rng = random.SystemRandom()
    for _ in range(200):
        port = rng.choice(SERVER_PORTS)
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
            try:
                probe.bind((host, port))
            except OSError:
                continue
            return port
    raise RuntimeError(f"no free port on {host} in {SERVER_PORTS.start}-{SERVER_PORTS.stop - 1}")
