"""Free ports on 127.0.0.1 for a local service, a simulated peer, a test or a benchmark.

Probed and released at once: another process may take a port before it is bound again, so a
caller that must be sure binds it itself; for loopback tests and benches this is what they
need. Only 127.0.0.1 is ever used.
"""

from __future__ import annotations

import socket

LOOPBACK = "127.0.0.1"


def _free(kind: socket.SocketKind) -> int:
    with socket.socket(socket.AF_INET, kind) as s:
        s.bind((LOOPBACK, 0))
        return int(s.getsockname()[1])


def free_tcp_port() -> int:
    """A TCP port free on 127.0.0.1 right now."""
    return _free(socket.SOCK_STREAM)


def free_udp_port() -> int:
    """A UDP port free on 127.0.0.1 right now."""
    return _free(socket.SOCK_DGRAM)


def free_udp_range(size: int, attempts: int = 50) -> tuple[int, int]:
    """(low, high): ``size`` consecutive UDP ports, ``low`` even (RTP's convention), all free on
    127.0.0.1 right now (each probed, then released)."""
    for _ in range(attempts):
        low = free_udp_port() & ~1
        socks: list[socket.socket] = []
        try:
            for port in range(low, low + size):
                sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
                socks.append(sock)
                sock.bind((LOOPBACK, port))
            return low, low + size - 1
        except (OSError, OverflowError):  # taken, or past port 65535
            continue
        finally:
            for sock in socks:
                sock.close()
    raise RuntimeError(f"no {size} consecutive free UDP ports on {LOOPBACK}")
