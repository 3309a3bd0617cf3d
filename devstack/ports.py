"""Free loopback ports for stacks that must not collide with a dev stack on the default ports (the
test suite, the benchmark rig). Never imports api, workflows or activities."""

from __future__ import annotations

import random
import socket

# Above the defaults of every service (5432x, 6379x, 7233, 8000-8233) and below the ephemeral range,
# so neither a dev stack nor an outgoing connection is likely to hold a picked port.
PORT_RANGE = (20_000, 45_000)


def port_is_free(port: int, host: str = "127.0.0.1") -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        # Same option the servers set, so a socket in TIME_WAIT from a previous run is no conflict.
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError:
            return False
    return True


def free_port_block(offsets: tuple[int, ...] = (0,), *, taken: set[int] | None = None) -> int:
    """A base port such that base + each offset is free now (Temporal also opens base+10 and
    base+11) and not in `taken`, which then records them, so one stack never gets a port twice."""
    low, high = PORT_RANGE
    for _ in range(200):
        base = random.randint(low, high)
        ports = {base + offset for offset in offsets}
        if (taken is None or ports.isdisjoint(taken)) and all(map(port_is_free, ports)):
            if taken is not None:
                taken.update(ports)
            return base
    raise RuntimeError("no free block of loopback ports found")
