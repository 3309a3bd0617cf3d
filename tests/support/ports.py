"""Free loopback ports for test stacks, so a suite never collides with a dev stack on the defaults."""

from __future__ import annotations

import random
import socket


def port_is_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def free_port_block(offsets: tuple[int, ...] = (0,)) -> int:
    """A base port such that base + each offset is free (Temporal also opens base+10 and base+11)."""
    for _ in range(200):
        base = random.randint(20_000, 45_000)
        if all(port_is_free(base + offset) for offset in offsets):
            return base
    raise RuntimeError("no free port block found")
