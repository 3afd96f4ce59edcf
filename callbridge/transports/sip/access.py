"""Who may talk to the SIP port, sans I/O: CIDR allow-lists and per-source rate limits.

Strangers get no answer at all: replying (even 403) tells a scanner that a SIP server lives
here and invites password guessing. Allowed sources are still rate limited per IP, so a trunk
gone mad or a spoofed flood costs each other call nothing but the dropped datagrams.
"""

from __future__ import annotations

import ipaddress
from collections import OrderedDict
from dataclasses import dataclass, field

__all__ = ["AllowList", "RateLimiter", "Trunk", "parse_networks"]

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


def parse_networks(text: str) -> tuple[Network, ...]:
    """``"10.0.0.0/8, 203.0.113.7"`` → networks. Raises ``ValueError`` naming the bad entry."""
    out: list[Network] = []
    for item in text.split(","):
        item = item.strip()
        if not item:
            continue
        try:
            out.append(ipaddress.ip_network(item, strict=False))
        except ValueError:
            raise ValueError(f"{item!r} is not an IP address or CIDR block") from None
    return tuple(out)


@dataclass(frozen=True)
class Trunk:
    """A named set of source networks (a carrier's signalling ranges, a PBX's address).

    ``digest``: calls from it must also pass digest auth (when a password is configured).
    """

    name: str
    networks: tuple[Network, ...]
    digest: bool = True


@dataclass(frozen=True)
class AllowList:
    """Trunks whose sources may send SIP, first match wins. Empty: nobody may."""

    trunks: tuple[Trunk, ...]

    @classmethod
    def of(cls, cidrs: str, *, name: str = "default", digest: bool = True) -> AllowList:
        return cls((Trunk(name, parse_networks(cidrs), digest),))

    def match(self, host: str) -> Trunk | None:
        try:
            ip = ipaddress.ip_address(host)
        except ValueError:
            return None
        if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
            ip = ip.ipv4_mapped
        for trunk in self.trunks:
            if any(ip in net for net in trunk.networks):
                return trunk
        return None

    def allows(self, host: str) -> bool:
        return self.match(host) is not None


@dataclass
class RateLimiter:
    """A token bucket per source IP: ``rate_per_s`` sustained, ``burst`` at once.

    At most ``max_sources`` buckets are kept (least recently seen evicted), so a spoofed
    source flood cannot grow memory.
    """

    rate_per_s: float
    burst: float
    max_sources: int = 4096
    dropped: int = 0
    _buckets: OrderedDict[str, tuple[float, float]] = field(default_factory=OrderedDict)  # ip -> (tokens, t)

    def allow(self, host: str, now: float) -> bool:
        tokens, last = self._buckets.pop(host, (self.burst, now))
        tokens = min(self.burst, tokens + (now - last) * self.rate_per_s)
        ok = tokens >= 1.0
        if ok:
            tokens -= 1.0
        else:
            self.dropped += 1
        self._buckets[host] = (tokens, now)
        while len(self._buckets) > self.max_sources:
            self._buckets.popitem(last=False)
        return ok
