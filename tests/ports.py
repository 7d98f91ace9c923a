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
    return free_ports(1, host)[0]


def free_ports(count: int, host: str = "127.0.0.1") -> list[int]:
    """``count`` distinct, currently free TCP ports on ``host`` below the ephemeral range.

    Distinct because two independent draws from the range can return the same port (1 in
    12,768 per pair, which a full suite's hundreds of two-port services do meet), and a service
    given one port twice refuses to start.
    """
    rng = random.SystemRandom()
    ports: list[int] = []
    for _ in range(200 * count):
        port = rng.choice(SERVER_PORTS)
        if port in ports:
            continue
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
            try:
                probe.bind((host, port))
            except OSError:
                continue
        ports.append(port)
        if len(ports) == count:
            return ports
    raise RuntimeError(
        f"no {count} free ports on {host} in {SERVER_PORTS.start}-{SERVER_PORTS.stop - 1}"
    )
